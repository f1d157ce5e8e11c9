//! The agent's core: one task owns the datapath and every owner, and turns what arrives
//! (changes of cluster state and policy, timer ticks, datapath events, handshake results,
//! admin requests) into calls on the owners. Nothing else writes the maps, so there are no
//! locks and no interleavings to reason about. The core decides nothing itself:
//!
//! - [`Inputs`] says what changed; [`Enforcer`] programs the endpoints and links for it;
//!   [`Auth`] revalidates the entries and flows it touched, and runs the entry lifecycle;
//! - [`Creds`] keeps SVIDs and the bundle and publishes the handshake view;
//! - [`Registry`] numbers names, and reclaims the numbers nothing uses any more;
//! - [`Journal`] keeps what happened for people.

mod requests;
#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use portcullis_common::{Counter, EVENT_WOULD_DROP, Event, IDENTITY_NONE};
use tokio::sync::{mpsc, watch};

use crate::{
    auth::{self, Auth, Entries, Scheduler, Scope},
    config::Config,
    creds::Creds,
    datapath::{
        self, Datapath, Kernel,
        route::{Netlink, Routes},
    },
    enforce::{Enforcer, HOST_IDENTITY},
    handshake::{Record, Role, Stage, WriteRefused},
    inputs::{ClusterSource, Inputs},
    journal::Journal,
    metrics::{Health, Metrics},
    registry::{Kind, Registry},
};

/// Workloads changed in one batch from which the allocator's free memory is returned to the
/// system: a batch that large leaves megabytes of transient allocations behind it.
const TRIM_AFTER: usize = 1024;

/// Revalidation owed: a pass that failed is retried, with everything it should have covered.
#[derive(Debug, Default)]
struct Owed {
    all: bool,
    pairs: HashSet<(Arc<str>, Arc<str>)>,
    addrs: HashSet<IpAddr>,
    cause: &'static str,
}

impl Owed {
    fn is_empty(&self) -> bool {
        !self.all && self.pairs.is_empty() && self.addrs.is_empty()
    }
}

/// What a restarted agent finds in the kernel and adopts.
#[derive(Debug, Default)]
pub struct Adopted {
    pub names: Vec<(portcullis_common::NameKey, String)>,
    pub endpoints: std::collections::HashMap<IpAddr, portcullis_common::Endpoint>,
    pub pinned_interfaces: Vec<u32>,
    pub entries: Vec<(portcullis_common::AuthKey, portcullis_common::AuthValue)>,
}

pub struct Core<K = Datapath, R: Routes = Netlink> {
    config: Config,
    started: Instant,
    dp: K,
    names: Registry,
    inputs: Inputs,
    enforce: Enforcer<R>,
    auth: Auth,
    creds: Creds,
    journal: Journal,
    metrics: Arc<Mutex<Metrics>>,
    health: watch::Sender<Health>,
    owed: Owed,
    /// What the sockops program does, for `status`.
    first_connection: String,
    /// Why removed map pins could not be made again, last logged (log once).
    map_pin_error: Option<String>,
    /// The node sessions (for status), once the agent has bound its listener.
    sessions: Option<Arc<crate::handshake::Sessions>>,
}

impl Core {
    /// Opens (or adopts) the datapath and assembles the owners.
    pub fn new(
        config: Config,
        records: mpsc::Sender<Record>,
        source: ClusterSource,
    ) -> anyhow::Result<(Self, datapath::Channels)> {
        let (dp, channels) =
            Datapath::open(&config.bpffs_dir, config.datapath_log).with_context(|| {
                format!("opening the datapath under {}", config.bpffs_dir.display())
            })?;
        let adopted = Adopted {
            names: dp.names()?,
            endpoints: dp.endpoints()?,
            pinned_interfaces: dp.dirs().pinned_interfaces()?,
            entries: dp.auth_entries()?,
        };
        tracing::info!(
            bpffs_dir = %config.bpffs_dir.display(),
            endpoints = adopted.endpoints.len(),
            auth_entries = adopted.entries.len(),
            pinned_interfaces = adopted.pinned_interfaces.len(),
            "datapath loaded; pinned state adopted"
        );
        Ok((
            Self::assemble(config, dp, Netlink, records, source, adopted)?,
            channels,
        ))
    }

    /// Attaches (or removes) the sockops program that shortens the first SYN timeout of
    /// connections whose pair is still cold.
    pub fn setup_first_connection(&mut self) -> anyhow::Result<()> {
        let fc = self.config.first_connection.clone();
        if fc.syn_rto_ms == 0 {
            self.dp.detach_sock_ops()?;
            "off (the kernel's 1 s SYN timeout)".clone_into(&mut self.first_connection);
            tracing::info!("first-connection SYN timeout program off");
            return Ok(());
        }
        let hz = match fc.kernel_hz {
            Some(hz) => hz,
            None => datapath::kernel_hz().map_err(|e| {
                anyhow::anyhow!("learning the kernel's HZ for the SYN timeout: {e}")
            })?,
        };
        let jiffies = (fc.syn_rto_ms * hz).div_ceil(1000).max(1);
        let cgroup = fc
            .cgroup
            .clone()
            .or_else(datapath::cgroup2_mount)
            .context("no cgroup v2 mount for the SYN timeout program; set first_connection.cgroup, or first_connection.syn_rto_ms: 0 to do without")?;
        self.dp.attach_sock_ops(&cgroup, jiffies).with_context(|| {
            format!("attaching the SYN timeout program to {}", cgroup.display())
        })?;
        self.first_connection = format!(
            "SYN retried after {} ms while a pair is cold ({jiffies} jiffies at HZ {hz}), on cgroup {}",
            u64::from(jiffies) * 1000 / u64::from(hz),
            cgroup.display()
        );
        tracing::info!(cgroup = %cgroup.display(), syn_rto_ms = fc.syn_rto_ms, hz, jiffies, "first-connection SYN timeout program attached");
        Ok(())
    }
}

impl<K: Kernel, R: Routes> Core<K, R> {
    /// The owners over `dp`, starting from what it already holds.
    pub fn assemble(
        config: Config,
        dp: K,
        routes: R,
        records: mpsc::Sender<Record>,
        source: ClusterSource,
        adopted: Adopted,
    ) -> anyhow::Result<Self> {
        let inputs = Inputs::new(&config.node, source, config.policy.clone())
            .context("no valid policy to start from")?;
        let scheduler = config.identity.as_ref().map(|_| {
            Scheduler::new(
                config.handshake.max_concurrent,
                config.handshake.timeout,
                records,
            )
        });
        let auth = Auth::new(
            &config.node,
            Entries::load(adopted.entries),
            scheduler,
            config.handshake.proactive,
            config.handshake.proactive_per_tick,
        )
        .with_udp_idle(config.udp_idle);
        let (health, _) = watch::channel(Health::starting());
        Ok(Self {
            creds: Creds::new(&config.node, config.identity.clone()),
            started: Instant::now(),
            names: Registry::load(adopted.names),
            enforce: Enforcer::new(routes, adopted.endpoints, adopted.pinned_interfaces)
                .with_pod_interfaces(config.pod_interfaces, config.cni_state_dir.clone()),
            dp,
            inputs,
            auth,
            journal: Journal::default(),
            metrics: Arc::new(Mutex::new(Metrics::new())),
            health,
            owed: Owed::default(),
            first_connection: String::new(),
            map_pin_error: None,
            sessions: None,
            config,
        })
    }

    #[must_use]
    pub fn metrics(&self) -> Arc<Mutex<Metrics>> {
        self.metrics.clone()
    }

    #[must_use]
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    #[must_use]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    #[must_use]
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    #[must_use]
    pub fn creds(&self) -> &Creds {
        &self.creds
    }

    /// Takes what changed in cluster state and policy and applies it: endpoints and links,
    /// then the entries and flows it touched, then credentials. Work is in proportion to what
    /// changed (a policy edit touches every entry).
    pub fn step(&mut self) {
        let update = self.inputs.poll();
        if !self.inputs.loaded() || update.is_empty() {
            return;
        }
        let started = Instant::now();
        let index = self.inputs.index();
        let policy = self.inputs.policy().clone();
        let synced = self.enforce.apply(
            &mut self.dp,
            &mut self.names,
            &index,
            &policy,
            &update.changes,
            update.policy,
        );
        drop(index);
        let changes = &update.changes;
        self.owed.all |= update.policy || changes.all;
        self.owed.pairs.extend(changes.pairs.iter().cloned());
        self.owed.addrs.extend(synced.changed.iter().copied());
        self.owed.cause = if update.policy {
            "policy changed"
        } else {
            "cluster state changed"
        };
        for (identity, node) in &changes.pairs {
            self.names.release_name(Kind::Identity, identity);
            self.names.release_name(Kind::Node, node);
        }
        let report = self.revalidate_owed();
        self.refresh_creds(changes.all || update.policy);
        self.reclaim_names();
        let took = started.elapsed();
        if changes.all || changes.workloads > 0 || update.policy || synced.set + synced.removed > 0
        {
            if changes.all || changes.workloads >= TRIM_AFTER {
                // A large batch (the first state, a list of every pod, a whole file) leaves
                // the allocator holding memory the agent no longer uses: give it back.
                // SAFETY: glibc's malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
            }
            let (checked, flows) = report.map_or((0, 0), |r| (r.entries_checked, r.flows_checked));
            tracing::info!(
                changes = changes.workloads,
                endpoints = self.enforce.programmed().len(),
                endpoints_set = synced.set,
                endpoints_removed = synced.removed,
                entries_checked = checked,
                flows_checked = flows,
                decode_us = u64::try_from(update.decode.as_micros()).unwrap_or(u64::MAX),
                took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                "cluster state applied"
            );
        }
        self.beat();
    }

    /// Revalidates what is owed; a failure keeps it owed, for the next tick.
    fn revalidate_owed(&mut self) -> Option<auth::Report> {
        if self.owed.is_empty() {
            return None;
        }
        let owed = std::mem::take(&mut self.owed);
        let scope = if owed.all {
            Scope::All
        } else {
            Scope::Touched {
                pairs: &owed.pairs,
                addrs: &owed.addrs,
            }
        };
        let index = self.inputs.index();
        let ctx = auth::Ctx {
            index: &index,
            names: &self.names,
            endpoints: self.enforce.programmed(),
            policy: self.inputs.policy(),
            view: self.creds.view(),
        };
        let result = self.auth.revalidate(&mut self.dp, &ctx, scope, owed.cause);
        drop(index);
        match result {
            Ok(report) => Some(report),
            Err(e) => {
                tracing::error!(error = %e, "revalidation failed; retrying at the next tick");
                self.owed = owed;
                None
            }
        }
    }

    /// Keeps SVIDs and the bundle current; a replaced local SVID re-proves its entries, a
    /// changed bundle every entry.
    fn refresh_creds(&mut self, republish: bool) {
        let index = self.inputs.index();
        let directory = self.inputs.directory();
        let refreshed = self
            .creds
            .refresh(&index, &directory, self.inputs.policy(), republish);
        let ctx = auth::Ctx {
            index: &index,
            names: &self.names,
            endpoints: self.enforce.programmed(),
            policy: self.inputs.policy(),
            view: self.creds.view(),
        };
        if !refreshed.rotated.is_empty() {
            let rotated: HashSet<u32> = refreshed
                .rotated
                .iter()
                .filter_map(|id| self.names.id_of(Kind::Identity, id.as_str()))
                .collect();
            self.auth
                .reprove(&ctx, |k| rotated.contains(&k.local_identity));
        }
        if refreshed.bundle {
            // First what can be checked here: the peer chains entries rest on and our own
            // SVIDs. A pair either no longer trusts is revoked at once, on each node, with no
            // session needed (a peer whose node SVID left the bundle cannot have one).
            let view = self.creds.view().borrow().clone();
            if let Some(view) = view {
                let local_untrusted: HashSet<u32> = view
                    .svids
                    .iter()
                    .filter(|(_, s)| view.chains.verify(&s.key.cert).is_err())
                    .filter_map(|(id, _)| self.names.id_of(Kind::Identity, id.as_str()))
                    .collect();
                let revoked = self.auth.recheck_trust(
                    &mut self.dp,
                    &self.names,
                    |c| view.chains.verify(c).is_ok(),
                    &local_untrusted,
                );
                if revoked > 0 {
                    tracing::info!(
                        revoked,
                        "trust bundle changed: pairs resting on SVIDs it no longer trusts revoked"
                    );
                }
            }
            let ctx = auth::Ctx {
                index: &index,
                names: &self.names,
                endpoints: self.enforce.programmed(),
                policy: self.inputs.policy(),
                view: self.creds.view(),
            };
            // Then every entry, with or without flows, is proven again. Each node proves its
            // own entries.
            let entries = self.auth.reprove(&ctx, |_| true);
            tracing::info!(
                entries,
                "trust bundle changed: every auth entry is proven again"
            );
        }
    }

    /// Forgets the numbers nothing uses any more: no workload, no auth entry.
    fn reclaim_names(&mut self) {
        for k in self.auth.take_removed() {
            self.names.release(Kind::Identity, k.local_identity);
            self.names.release(Kind::Identity, k.remote_identity);
            self.names.release(Kind::Node, k.remote_node);
        }
        let index = self.inputs.index();
        let entries = self.auth.entries();
        let here = &self.config.node;
        let reclaimed = self
            .names
            .reclaim(&mut self.dp, |kind, id, name| match kind {
                Kind::Identity => {
                    name == HOST_IDENTITY
                        || index.identity_in_use(name)
                        || entries.uses_identity(id)
                }
                Kind::Node => name == here || index.node_in_use(name) || entries.uses_node(id),
            });
        if reclaimed > 0 {
            tracing::debug!(
                reclaimed,
                "numbers of identities and nodes no longer used reclaimed"
            );
        }
    }

    /// Timer work: whatever changed, then what can change without cluster state saying so
    /// (node addresses, interfaces, pins), credentials, the entry lifecycle, owed work.
    pub fn tick(&mut self) {
        self.step();
        if !self.inputs.loaded() {
            self.beat();
            return;
        }
        self.enforce_now(false);
        self.refresh_creds(false);
        let index = self.inputs.index();
        let ctx = auth::Ctx {
            index: &index,
            names: &self.names,
            endpoints: self.enforce.programmed(),
            policy: self.inputs.policy(),
            view: self.creds.view(),
        };
        self.auth.tick(&mut self.dp, &ctx);
        drop(index);
        self.reclaim_names();
        self.repin();
        if let Err(e) = self.dp.set_clock() {
            tracing::error!(error = %e, "cannot update the clock the programs stamp connection MACs with");
        }
        self.beat();
    }

    /// What can change without cluster state saying so, applied: local pods' interfaces (and
    /// with `claims`, the claims `portcullis-cni` recorded, read now), the node's addresses,
    /// pins, writes to retry; then the revalidation it owes.
    fn enforce_now(&mut self, claims: bool) {
        let index = self.inputs.index();
        let policy = self.inputs.policy();
        let synced = if claims {
            self.enforce
                .claims_changed(&mut self.dp, &mut self.names, &index, policy)
        } else {
            self.enforce
                .tick(&mut self.dp, &mut self.names, &index, policy)
        };
        drop(index);
        self.owed.addrs.extend(synced.changed);
        if self.owed.cause.is_empty() {
            self.owed.cause = "endpoints changed";
        }
        self.revalidate_owed();
    }

    fn repin(&mut self) {
        match self.dp.repin_maps() {
            Ok(maps) => {
                if !maps.is_empty() {
                    tracing::warn!(?maps, pins = %self.dp.pin_dir().display(), "pinned maps vanished while the agent ran; pinned them again, so that a restart keeps their state");
                }
                self.map_pin_error = None;
            }
            Err(e) => {
                if crate::journal::is_new(&mut self.map_pin_error, e.to_string()) {
                    tracing::error!(error = %e, "pinned maps vanished and cannot be pinned again: enforcement goes on, but an agent started after this one would begin from empty maps; retrying at each tick");
                }
            }
        }
    }

    /// Publishes the cheap readiness value `/healthz` and `/readyz` answer from.
    fn beat(&self) {
        let not_ready = self.not_ready();
        self.health.send_replace(Health {
            ready: not_ready.is_empty(),
            not_ready,
            beat: Instant::now(),
            interval: self.config.poll_interval.max(Duration::from_millis(100)),
        });
    }

    /// A datapath event: journal, metrics, and the pair's authentication asked for. A SYN
    /// without a valid connection MAC asks for nothing: its pair is authenticated, proving it
    /// again cures nothing, and forged SYNs must not drive proofs.
    pub fn on_event(&mut self, ev: &Event) {
        let record = self.journal.event(ev, &self.names);
        if ev.kind == EVENT_WOULD_DROP {
            self.would_drop(&record);
        }
        let mac_failure = matches!(
            Counter::from_u32(ev.reason),
            Some(Counter::DropNoMac | Counter::DropBadMac)
        );
        if ev.remote_identity != IDENTITY_NONE && !mac_failure {
            let index = self.inputs.index();
            let ctx = auth::Ctx {
                index: &index,
                names: &self.names,
                endpoints: self.enforce.programmed(),
                policy: self.inputs.policy(),
                view: self.creds.view(),
            };
            self.auth.want(&ctx, auth::flow_pair(&ev.flow));
        }
    }

    /// The node sessions proofs go through (and status reads).
    pub fn use_sessions(&mut self, sessions: Arc<crate::handshake::Sessions>) {
        self.auth.set_sessions(sessions.clone());
        self.sessions = Some(sessions);
    }

    /// The responder's request: write this entry before answering.
    pub fn on_write(&mut self, rec: &Record) -> Result<(), WriteRefused> {
        let index = self.inputs.index();
        self.auth
            .write(
                &mut self.dp,
                &mut self.names,
                &index,
                self.inputs.policy(),
                rec,
            )
            .map_err(|e| WriteRefused {
                reason: e.reason(),
                detail: e.to_string(),
            })
    }

    /// A finished handshake: the initiator's entry is written here, the responder's was
    /// written before it answered. Either way, one audit record and the metrics.
    pub fn on_record(&mut self, mut rec: Record) {
        if rec.role == Role::Initiator && rec.stage == Stage::Proof && rec.result.is_ok() {
            let index = self.inputs.index();
            let written = self.auth.write(
                &mut self.dp,
                &mut self.names,
                &index,
                self.inputs.policy(),
                &rec,
            );
            drop(index);
            if let Err(e) = written {
                rec.result = Err(e.reason());
                rec.detail = Some(e.to_string());
            }
        }
        if let Ok(m) = self.metrics.lock() {
            m.on_handshake(&rec);
        }
        let index = self.inputs.index();
        if rec.result == Err(crate::reason::Reason::NoLocalSvid) {
            // A handshake waits for this SVID: it goes before the warm-up of the others.
            let local = rec.local_id.clone().or_else(|| {
                rec.local_addr
                    .and_then(|a| index.owner(&a))
                    .map(|w| w.identity.clone())
            });
            if let Some(id) = local {
                self.creds.urgent(&id);
            }
        }
        let ctx = auth::Ctx {
            index: &index,
            names: &self.names,
            endpoints: self.enforce.programmed(),
            policy: self.inputs.policy(),
            view: self.creds.view(),
        };
        self.auth.finished(&mut self.dp, &ctx, &rec);
        drop(index);
        self.journal.handshake(&self.config.node, &rec);
    }

    /// Why the agent is not ready, if it is not: local workloads without programs (no
    /// interface yet), identities without SVIDs, no trust bundle.
    #[must_use]
    pub fn not_ready(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .enforce
            .pending(&self.inputs.index())
            .into_iter()
            .map(|(w, why)| format!("{w} is not enforced yet: {why}"))
            .collect();
        if !self.inputs.loaded() {
            out.push("no cluster state".to_owned());
        }
        out.extend(self.creds.not_ready(&self.inputs.index()));
        out.sort();
        out.dedup();
        out
    }
}
