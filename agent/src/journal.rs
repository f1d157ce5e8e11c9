//! What happened, for people: recent datapath events (identical ones grouped, with a count),
//! recent handshakes, and the audit records on the `portcullis::audit` target with their rate
//! limit. Nothing here decides anything; the owners tell it what they did.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use portcullis_common::{Event, FlowKey};

use crate::{
    handshake::Record,
    identity::SpiffeId,
    registry::{Kind, Registry},
    status::{EventRecord, HandshakeInfo},
};

/// Event groups kept for `status`.
const RECENT_EVENTS: usize = 256;
/// Handshake outcomes kept for `status`.
const RECENT_HANDSHAKES: usize = 128;
const AUDIT_BURST: f64 = 200.0;
const AUDIT_PER_SEC: f64 = 50.0;

/// Records `now` as the latest of a recurring problem; true if it differs from the last one
/// (so that it is logged once, not at every pass).
pub fn is_new(last: &mut Option<String>, now: String) -> bool {
    if last.as_ref() == Some(&now) {
        return false;
    }
    *last = Some(now);
    true
}

/// A token bucket (`AUDIT_BURST` at once, `AUDIT_PER_SEC` sustained), so that a flood of failing
/// peers cannot fill a disk; what was suppressed is counted and reported in the next record
/// that gets through.
#[derive(Debug)]
pub struct Limiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            tokens: AUDIT_BURST,
            last: Instant::now(),
            suppressed: 0,
        }
    }
}

impl Limiter {
    /// `Some(n)` when a record may be written now, `n` records having been suppressed before it.
    pub fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * AUDIT_PER_SEC)
            .min(AUDIT_BURST);
        self.last = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// What makes two events the same for grouping: everything but their time and the ephemeral
/// port of the side that opened the connection (every retry of a client uses a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupKey {
    kind: u32,
    reason: u32,
    pair: (u32, u32, u32),
    flow: FlowKey,
}

fn group_key(ev: &Event) -> GroupKey {
    let mut flow = ev.flow;
    if ev.kind == portcullis_common::EVENT_AUTH_WANTED {
        flow.local_port = 0;
    } else {
        flow.remote_port = 0;
    }
    GroupKey {
        kind: ev.kind,
        reason: ev.reason,
        pair: (ev.local_identity, ev.remote_identity, ev.remote_node),
        flow,
    }
}

#[derive(Debug, Default)]
pub struct Journal {
    events: VecDeque<(GroupKey, EventRecord)>,
    events_total: u64,
    /// Events the ring-buffer reader could not hand over (the agent's queue was full).
    events_dropped: Arc<AtomicU64>,
    /// The per-event log line, rate-limited like the audit log.
    event_log: Limiter,
    audit: Limiter,
    handshakes: VecDeque<HandshakeInfo>,
}

impl Journal {
    /// The counter the ring-buffer reader increments.
    #[must_use]
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.events_dropped.clone()
    }

    #[must_use]
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn events_total(&self) -> u64 {
        self.events_total
    }

    /// Recent event groups, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &EventRecord> {
        self.events.iter().map(|(_, r)| r)
    }

    pub fn handshakes(&self) -> impl Iterator<Item = &HandshakeInfo> {
        self.handshakes.iter()
    }

    /// An audit record may be written now: `Some(records suppressed before it)`.
    pub fn admit_audit(&mut self) -> Option<u64> {
        self.audit.admit()
    }

    /// Records a datapath event (one log line, within the rate limit) and returns its
    /// readable form.
    pub fn event(&mut self, ev: &Event, names: &Registry) -> EventRecord {
        self.events_total += 1;
        let record = EventRecord::new(ev, |kind, n| names.name(kind, n));
        // A flood of connection attempts must not become a flood of log lines.
        if let Some(suppressed_before) = self.event_log.admit() {
            tracing::info!(
                kind = %record.kind, reason = %record.reason, local = %record.local, remote = %record.remote,
                remote_node = %record.remote_node, proto = %record.proto,
                from = %record.remote_addr, to = %record.local_addr, suppressed_before,
                "datapath event"
            );
        }
        let key = group_key(ev);
        if let Some(at) = self.events.iter().position(|(k, _)| *k == key) {
            if let Some((k, mut group)) = self.events.remove(at) {
                group.count += 1;
                group.boot_time_secs = record.boot_time_secs;
                group.local_addr.clone_from(&record.local_addr);
                group.remote_addr.clone_from(&record.remote_addr);
                self.events.push_back((k, group));
            }
        } else {
            if self.events.len() == RECENT_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back((key, record.clone()));
        }
        record
    }

    /// Records a finished handshake: one audit record (within the rate limit) and the recent
    /// list.
    pub fn handshake(&mut self, node: &str, rec: &Record) {
        if let Some(suppressed) = self.audit.admit() {
            audit_handshake(node, rec, suppressed);
        }
        if self.handshakes.len() == RECENT_HANDSHAKES {
            self.handshakes.pop_front();
        }
        self.handshakes.push_back(HandshakeInfo::from_record(rec));
    }
}

/// An entry removed by a change, on the audit target.
pub fn audit_revoked(
    names: &Registry,
    key: &portcullis_common::AuthKey,
    cause: &str,
    reason: &str,
    flows_cut: usize,
) {
    tracing::info!(
        target: "portcullis::audit",
        event = "revoked",
        local = %names.name(Kind::Identity, key.local_identity),
        remote = %names.name(Kind::Identity, key.remote_identity),
        remote_node = %names.name(Kind::Node, key.remote_node),
        cause,
        reason,
        flows_cut,
        "auth entry revoked"
    );
}

/// One structured audit record per handshake, on the `portcullis::audit` target.
fn audit_handshake(node: &str, rec: &Record, suppressed_before: u64) {
    let name = |id: &Option<SpiffeId>| {
        id.as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    };
    let (result, reason) = match rec.result {
        Ok(_) => ("ok", "-"),
        Err(r) => ("failed", r.as_str()),
    };
    tracing::info!(
        target: "portcullis::audit",
        event = "handshake",
        role = rec.role.as_str(),
        stage = rec.stage.as_str(),
        decided_by = if rec.result.is_err() { rec.decided_by.as_str() } else { "-" },
        result,
        reason,
        local = %name(&rec.local_id),
        remote = %name(&rec.remote_id),
        local_node = node,
        remote_node = rec.remote_node.as_deref().unwrap_or("-"),
        peer = %rec.peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        took_ms = u64::try_from(rec.took.as_millis()).unwrap_or(u64::MAX),
        detail = rec.detail.as_deref().unwrap_or("-"),
        suppressed_before,
        "handshake {result}{}",
        if rec.result.is_err() { format!(": {reason}") } else { String::new() }
    );
}

#[cfg(test)]
mod tests {
    use portcullis_common::{AF_INET, Counter, EVENT_DENIED, IPPROTO_TCP};

    use super::*;

    fn denied(port: u16) -> Event {
        let mut flow = FlowKey {
            proto: IPPROTO_TCP,
            family: AF_INET,
            local_port: 8080,
            remote_port: port,
            ..FlowKey::default()
        };
        flow.local_addr[..4].copy_from_slice(&[198, 18, 2, 2]);
        flow.remote_addr[..4].copy_from_slice(&[198, 18, 1, 2]);
        Event {
            kind: EVENT_DENIED,
            reason: Counter::DropNoAuth as u32,
            local_identity: 1,
            remote_identity: 2,
            remote_node: 1,
            flow,
            ..Event::default()
        }
    }

    /// A client retrying a refused connection is one line with a count, not one line per try.
    #[test]
    fn identical_events_are_grouped_with_a_count() {
        let mut j = Journal::default();
        let names = Registry::load(Vec::new());
        for port in 40_000..40_050 {
            j.event(&denied(port), &names);
        }
        let mut other = denied(41_000);
        other.reason = Counter::DropExpired as u32;
        j.event(&other, &names);
        j.event(&denied(40_100), &names);
        let groups: Vec<(&str, u64)> = j.events().map(|e| (e.reason.as_str(), e.count)).collect();
        assert_eq!(groups, [("drop_expired", 1), ("drop_no_auth", 51)]);
        assert_eq!(j.events_total(), 52);
        assert!(j.events().last().unwrap().remote_addr.ends_with(":40100"));
    }
}
