//! What the core answers: admin requests (status, entries by hand), and the audit record of a
//! would-be drop. The status is a read-only view assembled from the owners.

use anyhow::Context as _;
use portcullis_common::{AuthKey, Counter, capacity};

use super::Core;
use crate::{
    admin::{Request, Response},
    config::IdentitySource,
    datapath::{Kernel, route::Routes},
    enforce::attached_str,
    identity::SpiffeId,
    registry::Kind,
    status::{
        self, AgentInfo, ClusterRefusals, EventRecord, InterfaceInfo, MapFill, Status, boot_ns,
    },
};

/// How many refused pods `status` names (all are counted).
const REFUSALS_LISTED: usize = 20;

impl<K: Kernel, R: Routes> Core<K, R> {
    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::AuthAllow {
                local,
                remote,
                remote_node,
                ttl_secs,
            } => self.allow(&local, &remote, &remote_node, ttl_secs),
            Request::AuthRevoke {
                local,
                remote,
                remote_node,
            } => self.revoke(&local, &remote, &remote_node),
            Request::CniAdd { container_id } | Request::CniDel { container_id } => {
                Ok(self.cni(&container_id))
            }
        };
        result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
        })
    }

    /// `portcullis-cni` added or removed a claim: apply the claims now, and say where the
    /// container's pod stands.
    fn cni(&mut self, container_id: &str) -> Response {
        let started = std::time::Instant::now();
        // Cluster state first: the pod may have arrived since the last poll.
        self.step();
        if self.inputs.loaded() {
            self.enforce_now(true);
        }
        let (enforced, detail) = self.enforce.locals().enrollment(container_id);
        tracing::debug!(container_id, enforced, %detail, took_us = started.elapsed().as_micros() as u64, "portcullis-cni asked");
        Response::Enrollment { enforced, detail }
    }

    fn pair(&mut self, local: &str, remote: &str, remote_node: &str) -> anyhow::Result<AuthKey> {
        let local = SpiffeId::parse(local).with_context(|| format!("local identity `{local}`"))?;
        let remote =
            SpiffeId::parse(remote).with_context(|| format!("remote identity `{remote}`"))?;
        if remote_node.is_empty() {
            anyhow::bail!("remote node must not be empty");
        }
        Ok(AuthKey {
            local_identity: self
                .names
                .intern(&mut self.dp, Kind::Identity, local.as_str())?,
            remote_identity: self
                .names
                .intern(&mut self.dp, Kind::Identity, remote.as_str())?,
            remote_node: self.names.intern(&mut self.dp, Kind::Node, remote_node)?,
            kind: 0,
        })
    }

    fn allow(
        &mut self,
        local: &str,
        remote: &str,
        remote_node: &str,
        ttl_secs: u64,
    ) -> anyhow::Result<Response> {
        if ttl_secs == 0 {
            anyhow::bail!("ttl must be at least one second");
        }
        let key = self.pair(local, remote, remote_node)?;
        self.auth.allow(&mut self.dp, key, ttl_secs)?;
        tracing::info!(target: "portcullis::audit", event = "auth_allow", %local, %remote, %remote_node, ttl_secs, "auth entry written by hand");
        Ok(Response::Allowed {
            expires_in_secs: ttl_secs,
        })
    }

    fn revoke(&mut self, local: &str, remote: &str, remote_node: &str) -> anyhow::Result<Response> {
        let key = self.pair(local, remote, remote_node)?;
        let (entry_removed, flows_cut) = self.auth.revoke(&mut self.dp, &key)?;
        tracing::info!(target: "portcullis::audit", event = "auth_revoke", %local, %remote, %remote_node, entry_removed, flows_cut, "auth entry revoked by hand");
        self.reclaim_names();
        Ok(Response::Revoked {
            entry_removed,
            flows_cut,
        })
    }

    /// Mode `audit` admitted a connection that `enforce` would drop: one audit record, naming
    /// the policy when it is the policy that forbids the pair.
    pub(super) fn would_drop(&mut self, rec: &EventRecord) {
        if let Ok(m) = self.metrics.lock() {
            m.on_would_drop(&rec.reason);
        }
        let Some(suppressed_before) = self.journal.admit_audit() else {
            return;
        };
        let policy = self.inputs.policy();
        let detail = match (SpiffeId::parse(&rec.local), SpiffeId::parse(&rec.remote)) {
            (Ok(l), Ok(r)) if !policy.decide(&l, &r).authorized() => policy.denial(&l, &r),
            (Ok(l), Ok(r)) if rec.reason == Counter::DropPolicy.name() => format!(
                "policy `{}` admits {} from {r}, not {} {}",
                policy.name,
                policy.grant(&r, &l),
                rec.proto,
                rec.local_addr
            ),
            _ => format!("reason {}", rec.reason),
        };
        tracing::info!(
            target: "portcullis::audit",
            event = "would_drop",
            reason = %rec.reason,
            local = %rec.local,
            remote = %rec.remote,
            remote_node = %rec.remote_node,
            proto = %rec.proto,
            from = %rec.remote_addr,
            to = %rec.local_addr,
            detail = %detail,
            suppressed_before,
            "mode audit admitted a connection that enforce would drop"
        );
    }

    /// What the agent enforces, assembled from the owners (the flow table is read here).
    pub fn status(&self) -> anyhow::Result<Status> {
        let now = boot_ns();
        let not_ready = self.not_ready();
        let flows = self.dp.flows()?;
        let counters = self.dp.counters()?;
        let flow_stats = self.dp.flow_stats()?;
        let entries: Vec<_> = self.auth.entries().iter().map(|(k, v)| (*k, *v)).collect();
        let index = self.inputs.index();
        let policy = self.inputs.policy();
        let locals = self.enforce.locals();
        let degraded: std::collections::HashMap<String, String> =
            locals.degraded().into_iter().collect();
        let interfaces = locals
            .interfaces()
            .map(|(ifindex, i)| InterfaceInfo {
                workload: i.workload.clone(),
                identity: i.identity.to_string(),
                interface: i.name.clone(),
                ifindex,
                addresses: i.addresses.clone(),
                attached: attached_str(i.attached).to_owned(),
                mode: policy
                    .settings(&i.key.0, &i.identity)
                    .mode
                    .as_str()
                    .to_owned(),
                problem: degraded.get(&i.workload).cloned(),
            })
            .collect();
        let cluster_refusals = self.inputs.refusals().map(|r| ClusterRefusals {
            total: r.total.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            current: r.current.len() as u64,
            pods: r
                .current
                .iter()
                .take(REFUSALS_LISTED)
                .map(|(pod, why)| format!("{pod}: {why}"))
                .collect(),
        });
        let mut maps = self.map_fill(entries.len(), flows.len(), &counters);
        if let Some(f) = maps.iter_mut().find(|m| m.name == "flows") {
            f.evicted = flow_stats.evicted(flows.len() as u64);
        }
        Ok(Status {
            agent: AgentInfo {
                running: true,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                node: Some(self.config.node.clone()),
                pid: Some(std::process::id()),
                uptime_secs: Some(self.started.elapsed().as_secs()),
                config: Some(self.config.source.display().to_string()),
                cluster_state: Some(self.inputs.source().describe()),
                cluster_error: self.inputs.cluster_error().map(str::to_owned),
                bpffs_dir: self.config.bpffs_dir.display().to_string(),
                mode: policy.defaults.mode.as_str().to_owned(),
                policy: Some(match self.inputs.policy_source() {
                    Some(source) => format!("{} ({source})", policy.name),
                    None => "default (no policy file: any authenticated peer)".to_owned(),
                }),
                policy_error: self.inputs.policy_error().map(str::to_owned),
                first_connection: Some(self.first_connection.clone()),
                identity_source: match self.config.identity.as_ref().map(|i| &i.source) {
                    Some(IdentitySource::Ca { .. }) => "ca",
                    Some(IdentitySource::Files { .. }) => "files",
                    Some(IdentitySource::Issuer { .. }) => "issuer",
                    None => "none",
                }
                .to_owned(),
                ready: not_ready.is_empty(),
                not_ready,
            },
            interfaces,
            pending: self
                .enforce
                .pending(&index)
                .into_iter()
                .map(|(w, _)| w)
                .collect(),
            held: locals
                .held()
                .into_iter()
                .map(|(pod, iface)| format!("{pod} ({iface})"))
                .collect(),
            counters: status::counters(counters.clone()),
            maps,
            auth_total: entries.len() as u64,
            flows_total: flows.len() as u64,
            auth: status::auth_entries(&self.names, entries, now, &|k| {
                self.auth.entries().pair_keys(k).map(|p| {
                    (
                        crate::handshake::proof::fingerprint(&p.outbound),
                        crate::handshake::proof::fingerprint(&p.inbound),
                    )
                })
            }),
            flows: status::flows(&self.names, flows, now),
            events: self.journal.events().cloned().collect(),
            events_total: self.journal.events_total(),
            events_dropped: self.journal.events_dropped(),
            handshakes_deferred: self.auth.deferred(),
            identities: self.creds.identities(),
            node_svid_not_after_unix: self.creds.node_svid_not_after().map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            }),
            identity_problems: self.creds.problems().to_vec(),
            handshakes: self.journal.handshakes().cloned().collect(),
            sessions: self.sessions.as_ref().map_or_else(Vec::new, |s| {
                s.peers()
                    .into_iter()
                    .map(|(node, peer, ours)| status::SessionInfo {
                        node,
                        peer: peer.to_string(),
                        direction: if ours { "opened" } else { "accepted" }.to_owned(),
                    })
                    .collect()
            }),
            cluster_refusals,
            workloads: index.len() as u64,
            names_reclaimed: self.names.reclaimed(),
        })
    }

    fn map_fill(&self, auth: usize, flows: usize, counters: &[(Counter, u64)]) -> Vec<MapFill> {
        let r = self.enforce.refusals();
        let missing = self.enforce.missing();
        let (auth_refused, auth_error) = self.auth.refused();
        let fill = |name: &str, entries: usize, capacity: u32, refused: u64| MapFill {
            name: name.to_owned(),
            entries: entries as u64,
            capacity: u64::from(capacity),
            refused,
            missing: 0,
            evicted: 0,
            error: None,
        };
        let flows_refused = counters
            .iter()
            .find(|(c, _)| *c == Counter::DropFlowTableFull)
            .map_or(0, |(_, n)| *n);
        vec![
            MapFill {
                missing: missing as u64,
                error: (missing > 0 || r.endpoints > 0)
                    .then(|| r.endpoint_error.clone().or_else(|| r.name_error.clone()))
                    .flatten(),
                ..fill(
                    "endpoints",
                    self.enforce.programmed().len(),
                    capacity::ENDPOINTS * 2,
                    r.endpoints,
                )
            },
            MapFill {
                error: auth_error.map(str::to_owned),
                ..fill("auth", auth, capacity::AUTH, auth_refused)
            },
            fill("flows", flows, capacity::FLOWS, flows_refused),
            MapFill {
                missing: self.enforce.unnumbered() as u64,
                error: r.name_error.clone(),
                ..fill("names", self.names.entries(), capacity::NAMES, r.names)
            },
        ]
    }
}
