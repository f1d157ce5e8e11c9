//! The entry lifecycle's timer work: retries, expiry, renewal, proactive warm-up and the sweep
//! of idle UDP flows, run at every tick of the core.

use std::collections::HashSet;

use portcullis_common::AuthKey;

use super::{Auth, Ctx, RENEWAL_RECHECK_NS, Scheduler, UDP_SWEEP_NS, WARMUP_CHECKS, cut_flows};
use crate::{
    datapath::{AuthMap, FlowTable},
    journal,
    registry::Kind,
    status::boot_ns,
};

impl Auth {
    /// Timer work: retries whose backoff has passed, expired entries (removed, their flows cut:
    /// renewal keeps live pairs' entries fresh, so an expiry means the pair could not be
    /// proven again), renewal of entries in the last third of their lifetime, and proactive
    /// warm-up.
    pub fn tick<M: AuthMap + FlowTable>(&mut self, maps: &mut M, ctx: &Ctx<'_>) {
        if let Some(s) = self.scheduler.as_mut() {
            s.tick(ctx.view);
        }
        self.prove_unkeyed(ctx);
        self.drain_reproofs(ctx);
        let now = boot_ns();
        self.expire(maps, ctx, now);
        self.renew(maps, ctx, now);
        self.warm_up(ctx, now);
        if now.saturating_sub(self.swept_at) >= UDP_SWEEP_NS {
            self.swept_at = now;
            self.sweep_udp(maps, now);
        }
    }

    /// Once proofs can run, proves again the entries this agent found without pair keys: those
    /// an earlier version wrote (carried over from its auth map) and those written by hand.
    /// Until then they admit by address alone, as they did.
    fn prove_unkeyed(&mut self, ctx: &Ctx<'_>) {
        if self.unkeyed_proven
            || ctx.view.borrow().is_none()
            || !self.scheduler.as_ref().is_some_and(Scheduler::has_sessions)
        {
            return;
        }
        self.unkeyed_proven = true;
        let unkeyed: HashSet<AuthKey> = self
            .entries
            .iter()
            .filter(|(_, v)| v.flags & portcullis_common::AUTH_KEYED == 0)
            .map(|(k, _)| *k)
            .collect();
        if !unkeyed.is_empty() {
            let n = self.reprove(ctx, |k| unkeyed.contains(k));
            tracing::info!(entries = n, "entries without pair keys are proven again");
        }
    }

    /// Cuts UDP flows with no packet for longer than the idle timeout: UDP has no end of
    /// connection, so without this a flow would admit its 5-tuple for as long as the table
    /// keeps it. The next datagram of the pair is a new connection, admitted by its entry.
    pub fn sweep_udp<M: FlowTable>(&mut self, maps: &mut M, now: u64) {
        let idle = portcullis_common::seen_units(self.udp_idle_ns);
        let now = portcullis_common::seen_units(now);
        let started = self.started_seen;
        match cut_flows(maps, |k, v| {
            let seen = if v.seen == 0 { started } else { v.seen };
            k.proto == portcullis_common::IPPROTO_UDP && now.saturating_sub(seen) > idle
        }) {
            Ok(0) => {}
            Ok(n) => tracing::info!(flows_cut = n, "idle UDP flows cut"),
            Err(e) => tracing::warn!(error = %e, "sweeping idle UDP flows failed"),
        }
    }

    fn expire<M: AuthMap + FlowTable>(&mut self, maps: &mut M, ctx: &Ctx<'_>, now: u64) {
        let expired = self.entries.expired(now);
        if expired.is_empty() {
            return;
        }
        let mut gone = HashSet::new();
        for k in expired {
            match self.entries.remove(maps, &k) {
                Ok(_) => {
                    gone.insert(k);
                }
                Err(e) => tracing::warn!(error = %e, "removing an expired auth entry failed"),
            }
        }
        let cut = match cut_flows(maps, |_, v| gone.contains(&v.pair())) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cutting the flows of expired entries failed");
                0
            }
        };
        for k in &gone {
            journal::audit_revoked(
                ctx.names,
                k,
                "expired",
                "the pair was not proven again in time",
                0,
            );
        }
        tracing::info!(
            removed = gone.len(),
            flows_cut = cut,
            "expired auth entries removed"
        );
    }

    /// Starts a handshake for every due entry whose pair still has flows (with proactive
    /// authentication on, warm-up renews every authorized pair anyway).
    fn renew<M: FlowTable>(&mut self, maps: &M, ctx: &Ctx<'_>, now: u64) {
        if self.scheduler.is_none() {
            return;
        }
        let due: HashSet<AuthKey> = self
            .entries
            .due(now)
            .filter(|k| self.renewal_checked.get(k).is_none_or(|t| *t <= now))
            .collect();
        self.renewal_checked
            .retain(|k, _| self.entries.get(k).is_some());
        if due.is_empty() {
            return;
        }
        // The flow table can be large: read it only when some entry is due.
        let live: HashSet<AuthKey> = match maps.flows() {
            Ok(flows) => flows
                .into_iter()
                .map(|(_, v)| v.pair())
                .filter(|p| due.contains(p))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the flow table for renewals failed");
                return;
            }
        };
        for k in due {
            if !live.contains(&k) {
                self.renewal_checked.insert(k, now + RENEWAL_RECHECK_NS);
                continue;
            }
            if let Some(pair) = self.addresses(ctx, &k) {
                self.want(ctx, pair);
            }
        }
    }

    /// Proactive authentication: walks the pairs (local workload, workload of cluster state)
    /// and starts handshakes for those the policy authorizes without a fresh entry, within
    /// `proactive_per_tick` handshakes and [`WARMUP_CHECKS`] pairs per tick (a cursor carries on
    /// where the last tick stopped). Of the two nodes of a pair, only the one with the lower
    /// (node, address) initiates: one handshake writes the entries of both.
    pub(super) fn warm_up(&mut self, ctx: &Ctx<'_>, now: u64) {
        if !self.proactive || ctx.view.borrow().is_none() {
            return;
        }
        let Some(room) = self.scheduler.as_ref().map(Scheduler::room) else {
            return;
        };
        let budget = self.proactive_per_tick.min(room);
        let locals: Vec<&crate::inputs::Workload> = ctx.index.local_workloads().collect();
        let n = ctx.index.slot_count();
        let total = locals.len() * n;
        let (mut checked, mut started) = (0, 0);
        while checked < total.min(WARMUP_CHECKS) && started < budget {
            let i = self.warmup_cursor % total;
            self.warmup_cursor = self.warmup_cursor.wrapping_add(1);
            checked += 1;
            let (l, Some(r)) = (&locals[i / n], ctx.index.slot(i % n)) else {
                continue;
            };
            if std::ptr::eq(*l, r) {
                continue;
            }
            let (Some(la), Some(ra)) = (l.addresses.first(), r.addresses.first()) else {
                continue;
            };
            if (self.node.as_str(), *la) > (&*r.node, *ra) {
                continue;
            }
            let numbers = (
                ctx.names.id_of(Kind::Identity, l.identity.as_str()),
                ctx.names.id_of(Kind::Identity, r.identity.as_str()),
                ctx.names.id_of(Kind::Node, &r.node),
            );
            let authorized = if let (Some(li), Some(ri), Some(rn)) = numbers {
                let key = AuthKey {
                    local_identity: li,
                    remote_identity: ri,
                    remote_node: rn,
                    kind: 0,
                };
                if self.entries.fresh(&key, now) {
                    continue;
                }
                self.decisions
                    .get(ctx.policy, ctx.names, li, ri)
                    .is_some_and(|d| d.authorized())
            } else {
                ctx.policy.decide(&l.identity, &r.identity).authorized()
            };
            if authorized && self.want(ctx, (*la, *ra)) {
                started += 1;
            }
        }
        // Stopped by the budget rather than by having looked: there is more to start as soon
        // as proofs finish.
        self.warming = started == budget && budget > 0;
    }
}
