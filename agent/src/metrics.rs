//! Prometheus metrics, `/healthz` and `/readyz`, on a local HTTP port (hyper).
//!
//! Handshake metrics are recorded as handshakes finish; everything the datapath counts (drops
//! and passes by reason, map fill, ring-buffer losses) is read from the core's status snapshot
//! at scrape time, so a scrape always sees the kernel's current numbers. The probes answer from
//! [`Health`], a value the core publishes at every pass: cheap, and never stuck behind a busy
//! core.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request as HttpRequest, Response as HttpResponse, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};

use crate::{
    admin::{Call, Request, Response},
    handshake::Record,
    status::Status,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    role: String,
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    verdict: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

pub struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_seconds: Family<RoleLabels, Histogram>,
    sessions_established: Family<HandshakeLabels, Counter>,
    sessions: Gauge,
    packets: Family<PacketLabels, Counter>,
    last_packets: HashMap<String, u64>,
    events_lost: Counter,
    events_rate_limited: Counter,
    events_dropped: Counter,
    handshakes_deferred: Counter,
    last_dropped: u64,
    last_deferred: u64,
    auth_entries: Gauge,
    flows: Gauge,
    map_fill: Family<MapLabels, Gauge<f64, AtomicU64>>,
    map_refused: Family<MapLabels, Counter>,
    last_refused: HashMap<String, u64>,
    map_missing: Family<MapLabels, Gauge>,
    svid_expiry: Family<IdentityLabels, Gauge>,
    first_svid_expiry: Gauge,
    node_svid_expiry: Gauge,
    ready: Gauge,
    would_drop: Family<ReasonLabels, Counter>,
    flows_evicted: Counter,
    last_evicted: u64,
    cluster_refusals: Family<ReasonLabels, Counter>,
    last_cluster_refusals: HashMap<String, u64>,
    pods_refused: Gauge,
    workloads: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "proofs",
            "Workload proofs by role, result and failure reason",
            handshakes.clone(),
        );
        let sessions_established = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "session_establishments",
            "Node session set-ups by role (initiator: opened, responder: accepted), result and failure reason",
            sessions_established.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions",
            "Node sessions established now",
            sessions.clone(),
        );
        let handshake_seconds = Family::<RoleLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "proof_duration_seconds",
            "Workload proof duration (a session set-up it waited for included)",
            handshake_seconds.clone(),
        );
        let packets = Family::<PacketLabels, Counter>::default();
        registry.register(
            "datapath_packets",
            "Packets seen by the kernel programs, by verdict and reason",
            packets.clone(),
        );
        let events_lost = Counter::default();
        registry.register(
            "ringbuf_events_lost",
            "Datapath events lost because the ring buffer was full",
            events_lost.clone(),
        );
        let events_rate_limited = Counter::default();
        registry.register(
            "ringbuf_events_rate_limited",
            "Datapath events suppressed by the per-pair rate limit",
            events_rate_limited.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Datapath events read from the ring buffer that the agent was too busy to take",
            events_dropped.clone(),
        );
        let handshakes_deferred = Counter::default();
        registry.register(
            "handshakes_deferred",
            "Handshakes not started because too many were waiting for a slot (the pair asks again with its next packet)",
            handshakes_deferred.clone(),
        );
        let auth_entries = Gauge::default();
        registry.register(
            "auth_entries",
            "Auth entries in the kernel map",
            auth_entries.clone(),
        );
        let flows = Gauge::default();
        registry.register(
            "flows",
            "Tracked connections in the kernel map",
            flows.clone(),
        );
        let map_fill = Family::<MapLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "map_fill_ratio",
            "Entries over capacity, per kernel map",
            map_fill.clone(),
        );
        let map_refused = Family::<MapLabels, Counter>::default();
        registry.register(
            "map_writes_refused",
            "Writes a kernel map refused (full), per map; for flows, connections dropped for want of an entry",
            map_refused.clone(),
        );
        let map_missing = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_entries_missing",
            "Entries cluster state wants in a kernel map that are not there (the map is full)",
            map_missing.clone(),
        );
        let svid_expiry = Family::<IdentityLabels, Gauge>::default();
        registry.register(
            "svid_expiry_seconds",
            "Seconds until each local SVID expires",
            svid_expiry.clone(),
        );
        let first_svid_expiry = Gauge::default();
        registry.register(
            "first_svid_expiry_seconds",
            "Seconds until the first local SVID expires (how long the agent can go without its identity source)",
            first_svid_expiry.clone(),
        );
        let node_svid_expiry = Gauge::default();
        registry.register(
            "node_svid_expiry_seconds",
            "Seconds until the node SVID expires (identity source issuer)",
            node_svid_expiry.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when programs are attached and identities loaded",
            ready.clone(),
        );
        let would_drop = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "audit_would_drop",
            "Connections mode audit admitted that enforce would drop, by drop reason (reported events; per-pair rate-limited)",
            would_drop.clone(),
        );
        let flows_evicted = Counter::default();
        registry.register(
            "flows_evicted",
            "Flow entries the kernel's LRU evicted to make room (their connections are cut)",
            flows_evicted.clone(),
        );
        let cluster_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cluster_refusals",
            "Pods the Kubernetes source left out of cluster state (or some of their addresses), by reason",
            cluster_refusals.clone(),
        );
        let pods_refused = Gauge::default();
        registry.register(
            "pods_refused",
            "Pods left out of cluster state now",
            pods_refused.clone(),
        );
        let workloads = Gauge::default();
        registry.register("workloads", "Workloads in cluster state", workloads.clone());
        Self {
            flows_evicted,
            last_evicted: 0,
            cluster_refusals,
            last_cluster_refusals: HashMap::new(),
            pods_refused,
            workloads,
            would_drop,
            registry,
            handshakes,
            handshake_seconds,
            sessions_established,
            sessions,
            packets,
            last_packets: HashMap::new(),
            events_lost,
            events_rate_limited,
            events_dropped,
            handshakes_deferred,
            last_dropped: 0,
            last_deferred: 0,
            auth_entries,
            flows,
            map_fill,
            map_refused,
            last_refused: HashMap::new(),
            map_missing,
            svid_expiry,
            first_svid_expiry,
            node_svid_expiry,
            ready,
        }
    }

    pub fn on_would_drop(&self, reason: &str) {
        self.would_drop
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn on_handshake(&self, rec: &Record) {
        let role = rec.role.as_str().to_owned();
        let (result, reason) = match rec.result {
            Ok(_) => ("ok", String::new()),
            Err(r) => ("failed", r.as_str().to_owned()),
        };
        if rec.stage == crate::handshake::Stage::Session {
            self.sessions_established
                .get_or_create(&HandshakeLabels {
                    role,
                    result: result.to_owned(),
                    reason,
                })
                .inc();
            return;
        }
        self.handshakes
            .get_or_create(&HandshakeLabels {
                role: role.clone(),
                result: result.to_owned(),
                reason,
            })
            .inc();
        self.handshake_seconds
            .get_or_create(&RoleLabels { role })
            .observe(rec.took.as_secs_f64());
    }

    /// Brings the scrape-time metrics up to the status snapshot.
    pub fn update(&mut self, s: &Status) {
        for (name, value) in &s.counters {
            let last = self.last_packets.insert(name.clone(), *value).unwrap_or(0);
            // The kernel's counters only grow, unless the maps were recreated: then restart.
            let delta = value.checked_sub(last).unwrap_or(*value);
            match name.as_str() {
                "event_lost" => {
                    self.events_lost.inc_by(delta);
                }
                "event_rate_limited" => {
                    self.events_rate_limited.inc_by(delta);
                }
                _ => {
                    let (verdict, reason) = name.split_once('_').unwrap_or(("other", name));
                    self.packets
                        .get_or_create(&PacketLabels {
                            verdict: verdict.to_owned(),
                            reason: reason.to_owned(),
                        })
                        .inc_by(delta);
                }
            }
        }
        self.events_dropped
            .inc_by(s.events_dropped.saturating_sub(self.last_dropped));
        self.handshakes_deferred
            .inc_by(s.handshakes_deferred.saturating_sub(self.last_deferred));
        (self.last_dropped, self.last_deferred) = (s.events_dropped, s.handshakes_deferred);
        self.auth_entries
            .set(i64::try_from(s.auth_total).unwrap_or(i64::MAX));
        self.sessions
            .set(i64::try_from(s.sessions.len()).unwrap_or(i64::MAX));
        self.flows
            .set(i64::try_from(s.flows_total).unwrap_or(i64::MAX));
        for m in &s.maps {
            #[expect(clippy::cast_precision_loss, reason = "a ratio")]
            let ratio = if m.capacity == 0 {
                0.0
            } else {
                m.entries as f64 / m.capacity as f64
            };
            let labels = MapLabels {
                map: m.name.clone(),
            };
            self.map_fill.get_or_create(&labels).set(ratio);
            let last = self.last_refused.entry(m.name.clone()).or_insert(0);
            // A counter read from the kernel restarts when the maps were recreated.
            let delta = m.refused.checked_sub(*last).unwrap_or(m.refused);
            *last = m.refused;
            self.map_refused.get_or_create(&labels).inc_by(delta);
            self.map_missing
                .get_or_create(&labels)
                .set(i64::try_from(m.missing).unwrap_or(i64::MAX));
        }
        self.svid_expiry.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        for id in &s.identities {
            let left = i64::try_from(id.not_after_unix).unwrap_or(i64::MAX)
                - i64::try_from(now).unwrap_or(0);
            self.svid_expiry
                .get_or_create(&IdentityLabels {
                    identity: id.id.clone(),
                })
                .set(left);
        }
        let left = |t: u64| i64::try_from(t).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(0);
        self.first_svid_expiry.set(
            s.identities
                .iter()
                .map(|i| left(i.not_after_unix))
                .min()
                .unwrap_or(0),
        );
        self.node_svid_expiry
            .set(s.node_svid_not_after_unix.map_or(0, left));
        self.ready.set(i64::from(s.agent.ready));
        if let Some(f) = s.maps.iter().find(|m| m.name == "flows") {
            // Recomputed from the kernel's counts at each scrape: it only grows, unless the maps
            // were recreated.
            let delta = f
                .evicted
                .checked_sub(self.last_evicted)
                .unwrap_or(f.evicted);
            self.flows_evicted.inc_by(delta);
            self.last_evicted = f.evicted;
        }
        if let Some(r) = &s.cluster_refusals {
            for (reason, total) in &r.total {
                let last = self
                    .last_cluster_refusals
                    .insert(reason.clone(), *total)
                    .unwrap_or(0);
                self.cluster_refusals
                    .get_or_create(&ReasonLabels {
                        reason: reason.clone(),
                    })
                    .inc_by(total.saturating_sub(last));
            }
            self.pods_refused
                .set(i64::try_from(r.current).unwrap_or(i64::MAX));
        }
        self.workloads
            .set(i64::try_from(s.workloads).unwrap_or(i64::MAX));
    }

    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` and `/readyz` answer from: published by the core at every pass, read
/// without asking it (a probe must not queue behind the core's work, or build a status).
#[derive(Debug, Clone)]
pub struct Health {
    pub ready: bool,
    pub not_ready: Vec<String>,
    /// When the core last published.
    pub beat: Instant,
    /// How often it publishes (its tick).
    pub interval: Duration,
}

impl Health {
    #[must_use]
    pub fn starting() -> Self {
        Self {
            ready: false,
            not_ready: vec!["starting".to_owned()],
            beat: Instant::now(),
            interval: Duration::from_secs(1),
        }
    }

    /// How long without a beat the core counts as stuck: ten ticks, and at least 5 s.
    #[must_use]
    pub fn stuck_after(&self) -> Duration {
        (self.interval * 10).max(Duration::from_secs(5))
    }

    /// `Err(how long since the last beat)` when the core has not published for too long.
    pub fn alive(&self) -> Result<(), Duration> {
        let since = self.beat.elapsed();
        if since > self.stuck_after() {
            Err(since)
        } else {
            Ok(())
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (HTTP/1.1) on `listener`; each connection is
/// bounded in time.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    core: mpsc::Sender<Call>,
    health: watch::Receiver<Health>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, core, health) = (metrics.clone(), core.clone(), health.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (metrics, core, health) = (metrics.clone(), core.clone(), health.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&req, &metrics, &core, &health).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // A client that never finishes its request is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}

async fn status(core: &mpsc::Sender<Call>) -> Option<Status> {
    let (tx, rx) = oneshot::channel();
    core.send((Request::Status, tx)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(2), rx).await {
        Ok(Ok(Response::Status(s))) => Some(*s),
        _ => None,
    }
}

fn reply(code: StatusCode, ctype: &'static str, body: String) -> HttpResponse<Full<Bytes>> {
    let mut r = HttpResponse::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

async fn answer(
    req: &HttpRequest<Incoming>,
    metrics: &Mutex<Metrics>,
    core: &mpsc::Sender<Call>,
    health: &watch::Receiver<Health>,
) -> HttpResponse<Full<Bytes>> {
    const TEXT: &str = "text/plain";
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    let h = health.borrow().clone();
    let stuck = |since: Duration| {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!(
                "the agent's core has not answered for {} s\n",
                since.as_secs()
            ),
        )
    };
    match req.uri().path() {
        "/metrics" => match status(core).await {
            Some(s) => {
                let body = match metrics.lock() {
                    Ok(mut m) => {
                        m.update(&s);
                        m.encode()
                    }
                    Err(_) => String::new(),
                };
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                )
            }
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "the agent does not answer\n".into(),
            ),
        },
        "/healthz" => match h.alive() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ok\n".into()),
            Err(since) => stuck(since),
        },
        "/readyz" => match h.alive() {
            Err(since) => stuck(since),
            Ok(()) if h.ready => reply(StatusCode::OK, TEXT, "ready\n".into()),
            Ok(()) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {}\n", h.not_ready.join("; ")),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Probes are answered from the published readiness, without asking the core: a core that
    /// never answers does not make `/healthz` wait, and one that stops publishing is reported.
    #[tokio::test]
    async fn probes_answer_from_the_published_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A core that never answers: requests queue and are never read.
        let (core, _never_read) = mpsc::channel(1);
        let (tx, rx) = watch::channel(Health {
            ready: false,
            not_ready: vec!["no interface yet for default/web".into()],
            beat: Instant::now(),
            interval: Duration::from_millis(500),
        });
        tokio::spawn(serve(
            listener,
            Arc::new(Mutex::new(Metrics::new())),
            core,
            rx,
        ));
        let started = Instant::now();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let readyz = get(addr, "/readyz").await;
        assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
        assert!(
            readyz.contains("no interface yet for default/web"),
            "{readyz}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the probes waited for the core"
        );
        tx.send_modify(|h| {
            h.ready = true;
            h.not_ready.clear();
        });
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        tx.send_modify(|h| h.beat = Instant::now() - Duration::from_secs(60));
        let stuck = get(addr, "/healthz").await;
        assert!(stuck.starts_with("HTTP/1.1 503"), "{stuck}");
        assert!(stuck.contains("has not answered for 60 s"), "{stuck}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let post = {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }
}
