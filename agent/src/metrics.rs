//! Prometheus metrics, `/healthz` and `/readyz`, on a local HTTP port.
//!
//! Handshake metrics are recorded as handshakes finish; everything the datapath counts (drops
//! and passes by reason, map fill, ring-buffer losses) is read from the core's status snapshot
//! at scrape time, so a scrape always sees the kernel's current numbers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
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
    ready: Gauge,
    would_drop: Family<ReasonLabels, Counter>,
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
            "handshakes",
            "Handshakes by role, result and failure reason",
            handshakes.clone(),
        );
        let handshake_seconds = Family::<RoleLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "handshake_duration_seconds",
            "Handshake duration",
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
        Self {
            would_drop,
            registry,
            handshakes,
            handshake_seconds,
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
        self.ready.set(i64::from(s.agent.ready));
    }

    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
pub async fn serve(listener: TcpListener, metrics: Arc<Mutex<Metrics>>, core: mpsc::Sender<Call>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, core) = (metrics.clone(), core.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, metrics, core)).await;
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

async fn answer(
    mut stream: TcpStream,
    metrics: Arc<Mutex<Metrics>>,
    core: mpsc::Sender<Call>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = match (method, path) {
        ("GET", "/metrics") => match status(&core).await {
            Some(s) => {
                let body = match metrics.lock() {
                    Ok(mut m) => {
                        m.update(&s);
                        m.encode()
                    }
                    Err(_) => String::new(),
                };
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                )
            }
            None => (
                "503 Service Unavailable",
                "text/plain",
                "the agent does not answer\n".to_owned(),
            ),
        },
        ("GET", "/healthz") => match status(&core).await {
            Some(_) => ("200 OK", "text/plain", "ok\n".to_owned()),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "the agent does not answer\n".to_owned(),
            ),
        },
        ("GET", "/readyz") => match status(&core).await {
            Some(s) if s.agent.ready => ("200 OK", "text/plain", "ready\n".to_owned()),
            Some(s) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {}\n", s.agent.not_ready.join("; ")),
            ),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "the agent does not answer\n".to_owned(),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
