//! The session listener: accepts connections within limits (per-peer token buckets, a bound on
//! concurrent session set-ups, a time limit each) and hands each to [`Sessions`].

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Record, Role, Sessions, Stage};
use crate::reason::Reason;

/// What the listener lets peers hold: at most `max_concurrent` session set-ups (TLS) at once,
/// each bounded by `timeout`, and per peer address at most `peer_burst` new connections at once and
/// `peer_rate` per second sustained (a token bucket), so that one noisy or hostile address
/// cannot take the slots of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_concurrent: u32,
    pub peer_rate: u32,
    pub peer_burst: u32,
}

/// Per-address token buckets. Addresses whose bucket has refilled are forgotten once the
/// table passes [`PeerRates::MAX_TRACKED`], so its size is bounded by the addresses that were
/// active within the last `peer_burst / peer_rate` seconds.
struct PeerRates {
    buckets: HashMap<IpAddr, (f64, Instant)>,
    rate: f64,
    burst: f64,
}

impl PeerRates {
    const MAX_TRACKED: usize = 4096;

    fn new(limits: &Limits) -> Self {
        Self {
            buckets: HashMap::new(),
            rate: f64::from(limits.peer_rate),
            burst: f64::from(limits.peer_burst),
        }
    }

    fn refill(&self, (tokens, last): (f64, Instant), now: Instant) -> f64 {
        (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate).min(self.burst)
    }

    /// Takes one token for `ip`; false when its bucket is empty.
    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= Self::MAX_TRACKED && !self.buckets.contains_key(&ip) {
            let burst = self.burst;
            let buckets = std::mem::take(&mut self.buckets);
            self.buckets = buckets
                .into_iter()
                .filter(|(_, b)| self.refill(*b, now) < burst)
                .collect();
        }
        let bucket = self.buckets.get(&ip).copied().unwrap_or((self.burst, now));
        let tokens = self.refill(bucket, now);
        let admitted = tokens >= 1.0;
        self.buckets
            .insert(ip, (if admitted { tokens - 1.0 } else { tokens }, now));
        admitted
    }
}

/// A connection refused before its handshake began, for the audit log and the metrics.
fn refused(peer: SocketAddr, reason: Reason, detail: String) -> Record {
    let mut rec = Record::new(Role::Responder, Stage::Session);
    rec.peer = Some(peer);
    rec.result = Err(reason);
    rec.detail = Some(detail);
    rec
}

/// Accepts peers within `limits`: connections over a limit are closed at once, so idle or
/// slow peers cannot exhaust descriptors. Every outcome of a set-up, refusals included, goes
/// to `records` for the audit log (which rate-limits itself) and the metrics.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sessions: Arc<Sessions>,
    records: tokio::sync::mpsc::Sender<Record>,
    limits: Limits,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent as usize));
    let mut rates = PeerRates::new(&limits);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "handshake accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A refusal that cannot be queued is dropped: the queue is full of records already,
        // and the connection is closed either way.
        if !rates.admit(peer.ip(), Instant::now()) {
            drop(tcp);
            let _ = records.try_send(refused(
                peer,
                Reason::RateLimited,
                format!(
                    "more than {} new connections at once or {} per second from {} (handshake.peer_burst, handshake.peer_rate)",
                    limits.peer_burst,
                    limits.peer_rate,
                    peer.ip()
                ),
            ));
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(tcp);
            let _ = records.try_send(refused(
                peer,
                Reason::Busy,
                format!(
                    "{} session set-ups under way (handshake.max_concurrent)",
                    limits.max_concurrent
                ),
            ));
            continue;
        };
        let (sessions, records) = (sessions.clone(), records.clone());
        tokio::spawn(async move {
            let record = sessions.accept(tcp, peer).await;
            drop(permit);
            let _ = records.send(record).await;
        });
    }
}
