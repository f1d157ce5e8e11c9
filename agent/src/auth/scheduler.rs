//! The initiator's scheduler: turns "this pair needs authenticating" (datapath events,
//! renewals, rotations, warm-up) into handshakes, one in flight per pair, at most
//! `max_concurrent` at once, each bounded in time, failures retried with exponential backoff
//! and jitter. It is the one owner of retry state. Results go back to the agent's core, which
//! hands them to the auth owner.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::Instant,
};

use crate::{
    handshake::{self, Record, Sessions, View},
    reason::Reason,
};

/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Attempts per burst of demand before waiting for new demand.
const MAX_ATTEMPTS: u32 = 6;
/// Handshakes waiting for a slot, beyond which new demand is deferred (a flood of connection
/// attempts from many pairs must not queue without bound ahead of the next legitimate one).
const MAX_WAITING: usize = 1024;

/// A pair of workload addresses, seen from this node: ours first.
pub type AddrPair = (IpAddr, IpAddr);

#[derive(Debug, Default)]
struct PairState {
    in_flight: bool,
    attempts: u32,
    /// No new attempt before this instant (backoff after a failure).
    not_before: Option<Instant>,
}

pub struct Scheduler {
    pairs: HashMap<AddrPair, PairState>,
    /// Pairs to try again once their backoff has passed, and when.
    retries: Vec<(Instant, AddrPair)>,
    permits: Arc<Semaphore>,
    /// Proofs started and not finished, and how many may run at once.
    running: usize,
    max_concurrent: usize,
    /// Handshakes started but still waiting for a permit.
    waiting: Arc<AtomicUsize>,
    deferred: u64,
    timeout: Duration,
    results: mpsc::Sender<Record>,
    /// The node sessions proofs go through; none until the agent has bound its listener.
    sessions: Option<Arc<Sessions>>,
    rng: u64,
}

impl Scheduler {
    pub fn new(max_concurrent: u32, timeout: Duration, results: mpsc::Sender<Record>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            pairs: HashMap::new(),
            retries: Vec::new(),
            permits: Arc::new(Semaphore::new(max_concurrent as usize)),
            running: 0,
            max_concurrent: max_concurrent as usize,
            waiting: Arc::new(AtomicUsize::new(0)),
            deferred: 0,
            timeout,
            results,
            sessions: None,
            rng: (seed as u64) | 1,
        }
    }

    /// Whether proofs can run: the node sessions are set.
    #[must_use]
    pub fn has_sessions(&self) -> bool {
        self.sessions.is_some()
    }

    /// The node sessions to prove pairs through.
    pub fn set_sessions(&mut self, sessions: Arc<Sessions>) {
        self.sessions = Some(sessions);
    }

    /// Asks for the pair to be authenticated; a no-op while a proof for it is under way or
    /// backing off. Returns whether a proof was started.
    pub fn want(&mut self, pair: AddrPair, view: &watch::Receiver<Option<Arc<View>>>) -> bool {
        let Some(view) = view.borrow().clone() else {
            return false;
        };
        let Some(sessions) = self.sessions.clone() else {
            return false;
        };
        let state = self.pairs.entry(pair).or_default();
        if state.in_flight || state.not_before.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        if self.waiting.load(Ordering::Relaxed) >= MAX_WAITING {
            // The pair's next packet asks again (the kernel signals each pair every 100 ms).
            self.deferred += 1;
            return false;
        }
        state.in_flight = true;
        state.attempts += 1;
        self.running += 1;
        let permits = self.permits.clone();
        let results = self.results.clone();
        let timeout = self.timeout;
        let waiting = self.waiting.clone();
        waiting.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // The semaphore is never closed; a failure here would mean it was.
            let permit = permits.acquire_owned().await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            let Ok(_permit) = permit else {
                return;
            };
            let record = handshake::initiate(sessions, view, pair.0, pair.1, timeout).await;
            // The core has stopped when this fails: nothing left to tell.
            let _ = results.send(record).await;
        });
        true
    }

    /// Records the end of a handshake this scheduler started; after a failure the pair is
    /// retried once its backoff has passed, a few times, then only on new demand.
    pub fn finished(&mut self, pair: AddrPair, result: Result<(), Reason>) {
        if let Some(delay) = self.backoff(pair, result) {
            self.retries.push((Instant::now() + delay, pair));
        }
    }

    /// Starts the retries whose backoff has passed, and forgets idle pairs.
    pub fn tick(&mut self, view: &watch::Receiver<Option<Arc<View>>>) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.retries = later;
        for (_, pair) in due {
            self.want(pair, view);
        }
        self.prune();
    }

    /// How many more proofs background work (warm-up) may start now: enough to keep every
    /// slot busy and as many waiting, no more, so that demand from connections is not queued
    /// behind it.
    #[must_use]
    pub fn room(&self) -> usize {
        (2 * self.max_concurrent).saturating_sub(self.running)
    }

    /// Pairs waiting for a retry.
    #[must_use]
    pub fn retrying(&self) -> usize {
        self.retries.len()
    }

    /// The delay before `pair` may be retried (`None`: give up until new demand arrives).
    fn backoff(&mut self, pair: AddrPair, result: Result<(), Reason>) -> Option<Duration> {
        let state = self.pairs.entry(pair).or_default();
        if state.in_flight {
            self.running = self.running.saturating_sub(1);
        }
        state.in_flight = false;
        if result.is_ok() {
            self.pairs.remove(&pair);
            return None;
        }
        let exp = state.attempts.saturating_sub(1).min(16);
        let base = FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF);
        // ±25 % jitter so that a node's pairs do not retry in lockstep.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.75 + (self.rng % 1000) as f64 / 2000.0;
        let delay = base.mul_f64(jitter);
        state.not_before = Some(Instant::now() + delay);
        if state.attempts >= MAX_ATTEMPTS {
            // Stop retrying on our own; the next datapath event (rate-limited in the kernel)
            // starts a new series once the backoff has passed.
            state.attempts = 0;
            return None;
        }
        Some(delay)
    }

    /// Whether new demand would be deferred now ([`MAX_WAITING`] handshakes wait for a slot).
    #[must_use]
    pub fn saturated(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) >= MAX_WAITING
    }

    /// Handshakes not started because [`MAX_WAITING`] were already waiting.
    #[must_use]
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    /// Forgets pairs with no handshake under way whose backoff has passed.
    fn prune(&mut self) {
        let now = Instant::now();
        self.pairs
            .retain(|_, p| p.in_flight || p.not_before.is_some_and(|t| now < t) || p.attempts > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_with_jitter_and_stop() {
        let (tx, _rx) = mpsc::channel(1);
        let mut m = Scheduler::new(4, Duration::from_secs(1), tx);
        let pair: AddrPair = ("198.18.1.2".parse().unwrap(), "198.18.2.2".parse().unwrap());
        let mut delays = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            m.pairs.entry(pair).or_default().attempts += 1;
            delays.push(m.backoff(pair, Err(Reason::Unreachable)));
        }
        let d: Vec<Duration> = delays
            .iter()
            .take(MAX_ATTEMPTS as usize - 1)
            .map(|d| d.unwrap())
            .collect();
        for (i, w) in d.windows(2).enumerate() {
            assert!(w[1] > w[0], "attempt {i}: {w:?} does not grow");
        }
        assert!(
            d[0] >= FIRST_BACKOFF.mul_f64(0.75) && d[0] <= FIRST_BACKOFF.mul_f64(1.25),
            "{:?}",
            d[0]
        );
        assert_eq!(
            delays.last(),
            Some(&None),
            "gives up after {MAX_ATTEMPTS} attempts"
        );
        // A success clears the pair.
        m.pairs.entry(pair).or_default().in_flight = true;
        assert_eq!(m.backoff(pair, Ok(())), None);
        assert!(m.pairs.is_empty());
    }
}
