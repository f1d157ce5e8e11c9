//! What `portcullis status` shows, as served by the admin API and, when the agent is down,
//! rebuilt from the pinned maps alone.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use portcullis_common::{
    AF_INET, AuthKey, AuthValue, Counter, EVENT_AUTH_WANTED, EVENT_WOULD_DROP, Event, FLOW_INBOUND,
    FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP,
};

pub use crate::datapath::decode_event;
use serde::{Deserialize, Serialize};

use crate::registry::{Kind, Registry};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    /// Pod interfaces the programs are attached to.
    pub interfaces: Vec<InterfaceInfo>,
    /// Local workloads whose interface was not found (yet).
    pub pending: Vec<String>,
    /// Interfaces `portcullis-cni` holds in default-deny for pods that are no workload of this
    /// node in cluster state (yet): `namespace/name (interface)`.
    #[serde(default)]
    pub held: Vec<String>,
    pub counters: BTreeMap<String, u64>,
    #[serde(default)]
    pub maps: Vec<MapFill>,
    /// At most [`LISTED`] entries; `auth_total` says how many there are.
    pub auth: Vec<AuthEntry>,
    /// At most [`LISTED`] flows; `flows_total` says how many there are.
    pub flows: Vec<Flow>,
    #[serde(default)]
    pub auth_total: u64,
    #[serde(default)]
    pub flows_total: u64,
    /// Most recent datapath events, newest last.
    pub events: Vec<EventRecord>,
    pub events_total: u64,
    /// Events read from the ring buffer that the agent was too busy to take (on top of those
    /// the kernel could not queue: counter `event_lost`).
    #[serde(default)]
    pub events_dropped: u64,
    /// Handshakes not started because too many were already waiting for a slot; the pair asks
    /// again with its next packet.
    #[serde(default)]
    pub handshakes_deferred: u64,
    /// Local workloads' SVIDs.
    #[serde(default)]
    pub identities: Vec<IdentityInfo>,
    /// Why an identity source or the trust bundle is (partly) unusable.
    #[serde(default)]
    pub identity_problems: Vec<String>,
    /// When the node SVID expires (identity source `issuer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_svid_not_after_unix: Option<u64>,
    /// Most recent handshakes, newest last.
    #[serde(default)]
    pub handshakes: Vec<HandshakeInfo>,
    /// The node sessions up now.
    #[serde(default)]
    pub sessions: Vec<SessionInfo>,
    /// Pods the Kubernetes source left out of cluster state (mirror pods, addresses outside
    /// their node's pod CIDRs, node addresses, addresses an older pod still holds, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_refusals: Option<ClusterRefusals>,
    /// Workloads in cluster state.
    #[serde(default)]
    pub workloads: u64,
    /// Identity and node numbers reclaimed since start (their names left cluster state).
    #[serde(default)]
    pub names_reclaimed: u64,
}

/// What the Kubernetes source refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterRefusals {
    /// Refusals since start, by kind (`mirror_pod`, `outside_pod_cidrs`, `node_address`,
    /// `address_in_use`, `unknown_node`, `bad_address`, `identity`).
    pub total: BTreeMap<String, u64>,
    /// Pods refused now.
    pub current: u64,
    /// The first of them, with why.
    pub pods: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub id: String,
    pub serial: String,
    pub not_after_unix: u64,
    /// When the agent replaces it (`ca` source).
    pub renew_in_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandshakeInfo {
    pub role: String,
    /// `session` (a node session set up) or `proof` (a pair's workload proof).
    #[serde(default)]
    pub stage: String,
    /// Who decided a failure: `transport` (no session, a TLS alert, a reset, a timeout:
    /// never authenticated, never revokes), `us` (our check inside the session) or `peer`
    /// (the peer's refusal inside the session).
    #[serde(default)]
    pub decided_by: Option<String>,
    /// `ok` or `failed`.
    pub result: String,
    pub reason: Option<String>,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub remote_node: Option<String>,
    pub peer: Option<String>,
    pub took_ms: u64,
    pub unix_time: u64,
    /// More about a failure (which policy, which rules).
    #[serde(default)]
    pub detail: Option<String>,
}

impl HandshakeInfo {
    #[must_use]
    pub fn from_record(rec: &crate::handshake::Record) -> Self {
        Self {
            role: rec.role.as_str().to_owned(),
            stage: rec.stage.as_str().to_owned(),
            decided_by: rec
                .result
                .is_err()
                .then(|| rec.decided_by.as_str().to_owned()),
            result: if rec.result.is_ok() { "ok" } else { "failed" }.to_owned(),
            reason: rec.result.err().map(|r| r.as_str().to_owned()),
            local: rec.local_id.as_ref().map(ToString::to_string),
            remote: rec.remote_id.as_ref().map(ToString::to_string),
            remote_node: rec.remote_node.clone(),
            peer: rec.peer.map(|p| p.to_string()),
            took_ms: u64::try_from(rec.took.as_millis()).unwrap_or(u64::MAX),
            detail: rec.detail.clone(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// False when the agent did not answer and this was read from the pinned maps.
    pub running: bool,
    pub version: String,
    pub node: Option<String>,
    pub pid: Option<u32>,
    pub uptime_secs: Option<u64>,
    pub config: Option<String>,
    pub cluster_state: Option<String>,
    /// Why the latest edit of the cluster state was rejected (the last good one stays).
    pub cluster_error: Option<String>,
    pub bpffs_dir: String,
    /// The policy's default mode: `enforce`, `audit` or `off` (namespaces may override it;
    /// each interface shows its own).
    #[serde(default)]
    pub mode: String,
    /// The policy in force: its name, and the file it came from.
    #[serde(default)]
    pub policy: Option<String>,
    /// Why the latest edit of the policy was rejected (the last good one stays).
    #[serde(default)]
    pub policy_error: Option<String>,
    /// What the sockops program does for connections of pairs still cold.
    #[serde(default)]
    pub first_connection: Option<String>,
    /// `ca`, `files`, or `none` (enforcing, not authenticating).
    #[serde(default)]
    pub identity_source: String,
    /// Programs attached for every local workload and identities loaded.
    #[serde(default)]
    pub ready: bool,
    /// What keeps it from being ready.
    #[serde(default)]
    pub not_ready: Vec<String>,
}

/// A kernel map's fill level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    /// Writes the kernel refused since the agent started (for `flows`, connections dropped
    /// because no entry could be made).
    #[serde(default)]
    pub refused: u64,
    /// What cluster state wants in the map and is not there, now: addresses for `endpoints`,
    /// workloads left unnumbered for `names`.
    #[serde(default)]
    pub missing: u64,
    /// `flows`: entries the kernel's LRU evicted to make room (connections recorded, neither
    /// removed by the agent nor still there).
    #[serde(default)]
    pub evicted: u64,
    /// What the kernel said at the latest refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub workload: String,
    pub identity: String,
    pub interface: String,
    pub ifindex: u32,
    pub addresses: Vec<IpAddr>,
    /// `adopted` (a pinned link kept, its program replaced) or `new`.
    pub attached: String,
    /// The pod's policy mode.
    #[serde(default)]
    pub mode: String,
    /// Why the interface's lookup fails while the pod stays enforced on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthEntry {
    pub local: String,
    pub remote: String,
    pub remote_node: String,
    pub age_secs: u64,
    /// Negative once expired (the kernel no longer admits new connections with it).
    pub expires_in_secs: i64,
    /// What the remote may open towards the local workload: `all`, `none`, or port ranges.
    #[serde(default)]
    pub inbound_ports: String,
    /// Fingerprints of the pair keys the proof derived (for connections the local workload
    /// opens, and for those the remote opens); none for an entry not written by a proof
    /// since the agent started.
    #[serde(default)]
    pub key_out: Option<String>,
    #[serde(default)]
    pub key_in: Option<String>,
}

/// A node session with another agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub node: String,
    pub peer: String,
    /// `opened` by this agent or `accepted` from the peer.
    pub direction: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flow {
    pub proto: String,
    /// `inbound` (the peer connected to the pod) or `outbound`.
    pub direction: String,
    pub local: String,
    pub remote: String,
    pub local_identity: String,
    pub remote_identity: String,
    pub remote_node: String,
    pub age_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    /// `denied` or `auth_wanted`.
    pub kind: String,
    /// The counter name that explains it, such as `drop_no_auth`.
    pub reason: String,
    pub local: String,
    pub remote: String,
    pub remote_node: String,
    pub proto: String,
    pub local_addr: String,
    pub remote_addr: String,
    /// Seconds since boot (`CLOCK_BOOTTIME`) of the latest event of its group, comparable with
    /// other events.
    pub boot_time_secs: f64,
    /// Identical events (but for the opener's ephemeral port) grouped into this one.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

impl EventRecord {
    /// The readable form of `ev`, with identity and node numbers turned into names by `name`.
    /// Every field of `ev` may hold any value: unknown kinds read as `denied`, unknown reasons
    /// as `unknown`.
    pub fn new(ev: &Event, name: impl Fn(Kind, u32) -> String) -> Self {
        Self {
            kind: match ev.kind {
                EVENT_AUTH_WANTED => "auth_wanted",
                EVENT_WOULD_DROP => "would_drop",
                _ => "denied",
            }
            .to_owned(),
            reason: Counter::from_u32(ev.reason)
                .map_or("unknown", Counter::name)
                .to_owned(),
            local: name(Kind::Identity, ev.local_identity),
            remote: name(Kind::Identity, ev.remote_identity),
            remote_node: name(Kind::Node, ev.remote_node),
            proto: proto_name(ev.flow.proto),
            local_addr: sock(
                flow_addr(ev.flow.family, &ev.flow.local_addr),
                ev.flow.local_port,
            ),
            remote_addr: sock(
                flow_addr(ev.flow.family, &ev.flow.remote_addr),
                ev.flow.remote_port,
            ),
            #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
            boot_time_secs: ev.time_ns as f64 / 1e9,
            count: 1,
        }
    }
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock the kernel programs use.
#[must_use]
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// `CLOCK_REALTIME` now, in nanoseconds.
#[must_use]
pub fn real_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[must_use]
pub fn counters(values: Vec<(Counter, u64)>) -> BTreeMap<String, u64> {
    values
        .into_iter()
        .map(|(c, v)| (c.name().to_owned(), v))
        .collect()
}

/// How many auth entries and flows a status lists: a full table (hundreds of thousands) would
/// make every `status` and metrics scrape slow and its output unreadable.
pub const LISTED: usize = 1000;

/// The first [`LISTED`] of `entries`, by local identity, remote identity and node.
#[must_use]
pub fn auth_entries(
    reg: &Registry,
    mut entries: Vec<(AuthKey, AuthValue)>,
    now: u64,
    keys: &dyn Fn(&AuthKey) -> Option<(String, String)>,
) -> Vec<AuthEntry> {
    if entries.len() > LISTED {
        // Numbers, not names, choose which are listed: converting every entry is what a
        // full table cannot afford.
        entries.sort_unstable_by_key(|(k, _)| (k.local_identity, k.remote_identity, k.remote_node));
        entries.truncate(LISTED);
    }
    let mut out: Vec<AuthEntry> = entries
        .into_iter()
        .map(|(k, v)| {
            let (key_out, key_in) = keys(&k).unzip();
            AuthEntry {
                key_out,
                key_in,
                local: reg.name(Kind::Identity, k.local_identity),
                remote: reg.name(Kind::Identity, k.remote_identity),
                remote_node: reg.name(Kind::Node, k.remote_node),
                age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
                expires_in_secs: secs_signed(v.expires_ns, now),
                inbound_ports: inbound_ports(&v),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.local, &a.remote, &a.remote_node).cmp(&(&b.local, &b.remote, &b.remote_node))
    });
    out
}

/// An entry's inbound grant, as policy writes it.
#[must_use]
pub fn inbound_ports(v: &AuthValue) -> String {
    if v.flags & portcullis_common::AUTH_ALL_PORTS != 0 {
        return "all".to_owned();
    }
    let n = (v.nports as usize).min(v.ports.len());
    if n == 0 {
        return "none".to_owned();
    }
    v.ports[..n]
        .iter()
        .map(crate::policy::port_range_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn secs_signed(at: u64, now: u64) -> i64 {
    let d = i128::from(at) - i128::from(now);
    i64::try_from(d / 1_000_000_000).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

/// The first [`LISTED`] of `entries`, by local then remote address and port.
#[must_use]
pub fn flows(reg: &Registry, mut entries: Vec<(FlowKey, FlowValue)>, now: u64) -> Vec<Flow> {
    if entries.len() > LISTED {
        entries.sort_unstable_by_key(|(k, _)| {
            (
                k.family,
                k.local_addr,
                k.local_port,
                k.remote_addr,
                k.remote_port,
            )
        });
        entries.truncate(LISTED);
    }
    let mut out: Vec<Flow> = entries
        .into_iter()
        .map(|(k, v)| Flow {
            proto: proto_name(k.proto),
            direction: if v.flags & FLOW_INBOUND != 0 {
                "inbound"
            } else {
                "outbound"
            }
            .to_owned(),
            local: sock(flow_addr(k.family, &k.local_addr), k.local_port),
            remote: sock(flow_addr(k.family, &k.remote_addr), k.remote_port),
            local_identity: reg.name(Kind::Identity, v.local_identity),
            remote_identity: reg.name(Kind::Identity, v.remote_identity),
            remote_node: reg.name(Kind::Node, v.remote_node),
            age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
        })
        .collect();
    out.sort_by(|a, b| (&a.local, &a.remote).cmp(&(&b.local, &b.remote)));
    out
}

/// The address a flow key stores in 16 bytes.
#[must_use]
pub fn flow_addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

#[must_use]
pub fn sock(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        p => format!("ip-{p}"),
    }
}
