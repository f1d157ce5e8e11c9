//! The ABI between portcullis's kernel programs (`ebpf/`) and its agent (`agent/`).
//!
//! Every type that crosses the boundary is `#[repr(C)]`, `Copy`, and free of implicit padding
//! (padding bytes are explicit `_pad` fields, always zero), so that a key built in user space
//! hashes to the same bucket as the key the kernel builds. A `const` assertion next to each type
//! pins its size: changing a layout is a deliberate ABI change, and it also changes the pinned
//! maps an upgraded agent adopts (see `agent/src/datapath.rs`).
#![no_std]

use core::mem::size_of;

pub mod mac;

/// Map names, shared by both sides. Maps are pinned by name under `<bpffs_dir>/maps/`.
pub mod map {
    /// Hash, IPv4 address → [`super::Endpoint`].
    pub const ENDPOINTS_V4: &str = "PC_EP_V4";
    /// Hash, IPv6 address → [`super::Endpoint`].
    pub const ENDPOINTS_V6: &str = "PC_EP_V6";
    /// Hash, [`super::AuthKey`] → [`super::AuthValue`].
    pub const AUTH: &str = "PC_AUTH";
    /// LRU hash, [`super::FlowKey`] → [`super::FlowValue`].
    pub const FLOWS: &str = "PC_FLOWS";
    /// LRU hash, [`super::AuthKey`] → last event time (boot ns): per-pair event rate limit.
    pub const EVENT_RATE: &str = "PC_EV_RATE";
    /// Ring buffer of [`super::Event`].
    pub const EVENTS: &str = "PC_EVENTS";
    /// Per-CPU array of `u64`, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "PC_COUNTERS";
    /// Hash, [`super::NameKey`] → [`super::Name`]: the agent's numbering of identities and
    /// nodes. The kernel never reads it; it lives in bpffs so that the numbering survives an
    /// agent restart together with the maps that use the numbers.
    pub const NAMES: &str = "PC_NAMES";
    /// Array of one `u32`: the initial SYN retransmission timeout, in jiffies, that the sockops
    /// program gives a connection whose pair is not yet authenticated; 0: leave the kernel's.
    pub const SYN_RTO: &str = "PC_SYN_RTO";
    /// Per-CPU array of `u64`, indexed by `FLOW_STAT_*`: what happened to the flow table,
    /// so that the entries the kernel's LRU evicted can be told from those the agent removed.
    pub const FLOW_STATS: &str = "PC_FLOW_STATS";
    /// Array of one `u64`: `CLOCK_REALTIME − CLOCK_BOOTTIME` in nanoseconds (wrapping), written
    /// by the agent, so that the programs can stamp and check the time in connection MACs
    /// ([`super::mac`]) on a clock every node shares.
    pub const CLOCK: &str = "PC_CLOCK";
}

/// [`map::FLOW_STATS`]: flows recorded under a key the table did not hold (kernel).
pub const FLOW_STAT_RECORDED: u32 = 0;
/// [`map::FLOW_STATS`]: flows recorded over an entry of the same key (kernel).
pub const FLOW_STAT_REPLACED: u32 = 1;
/// [`map::FLOW_STATS`]: entries the agent removed (cuts, idle UDP flows); written by the
/// agent into CPU 0's slot.
pub const FLOW_STAT_REMOVED: u32 = 2;
/// Slots of [`map::FLOW_STATS`].
pub const FLOW_STATS: u32 = 4;

/// Program names (the function names in `ebpf/src/main.rs`).
pub mod program {
    /// tc egress of a pod's host-side interface: packets going *to* the pod.
    pub const TO_POD: &str = "pc_to_pod";
    /// tc ingress of a pod's host-side interface: packets coming *from* the pod.
    pub const FROM_POD: &str = "pc_from_pod";
    /// sockops on the pods' cgroup: a short initial SYN timeout for pairs still cold.
    pub const SOCK_OPS: &str = "pc_sock_ops";
}

/// Map capacities.
pub mod capacity {
    pub const ENDPOINTS: u32 = 262_144;
    pub const AUTH: u32 = 131_072;
    pub const FLOWS: u32 = 262_144;
    pub const EVENT_RATE: u32 = 65_536;
    /// Bytes; a power of two and a multiple of the page size.
    pub const EVENTS_BYTES: u32 = 1 << 20;
    pub const NAMES: u32 = 131_072;
}

/// Minimum interval between two events for the same pair and kind, in nanoseconds. A SYN
/// flood for one pair therefore costs the agent at most 10 events per second per pair.
pub const EVENT_INTERVAL_NS: u64 = 100_000_000;

/// Identity number 0: no identity (the address is not in cluster state).
pub const IDENTITY_NONE: u32 = 0;

/// [`Endpoint::flags`]: the endpoint is a pod on this node, behind `ifindex`.
pub const EP_LOCAL: u32 = 1;
/// [`Endpoint::flags`]: an address of this node itself (kubelet probes come from it).
pub const EP_HOST: u32 = 2;
/// [`Endpoint::flags`] of a local pod: policy mode `enforce` (drop what is not admitted).
pub const EP_ENFORCE: u32 = 4;
/// [`Endpoint::flags`] of a local pod: policy mode `audit` (admit, but report what `enforce`
/// would drop). Neither this nor [`EP_ENFORCE`]: mode `off`, everything passes.
pub const EP_AUDIT: u32 = 8;
/// [`Endpoint::flags`] of a local pod: connections from this node's own addresses are admitted.
pub const EP_ADMIT_HOST: u32 = 16;
/// [`Endpoint::flags`] of a local pod: IP protocols other than TCP, UDP and ICMP pass.
pub const EP_OTHER_PASS: u32 = 32;
/// [`Endpoint::flags`] of a local pod: connection MACs mode `require`: a new TCP connection of
/// a keyed pair is admitted only with a SYN whose MAC verifies ([`mac`]).
pub const EP_MAC_REQUIRE: u32 = 64;
/// [`Endpoint::flags`] of a local pod: connection MACs mode `audit`: a missing or bad MAC is
/// reported, not dropped. Neither this nor [`EP_MAC_REQUIRE`]: MACs are not checked.
pub const EP_MAC_AUDIT: u32 = 128;
/// [`Endpoint::flags`] of a local pod: new UDP flows from pods on other nodes are refused
/// (`drop_policy`): UDP cannot carry a MAC, so it is bound only to the source address.
pub const EP_UDP_NODE_LOCAL: u32 = 256;

/// Where an address belongs: value of the endpoint maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Endpoint {
    /// Agent-local identity number (see [`map::NAMES`]); never [`IDENTITY_NONE`].
    pub identity: u32,
    /// Agent-local node number.
    pub node: u32,
    /// Host-side interface index of a local pod; 0 for remote endpoints.
    pub ifindex: u32,
    /// `EP_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<Endpoint>() == 16);

/// An authenticated pair: the auth map's key, also the event rate-limit key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
    /// The event kind for [`map::EVENT_RATE`]; always 0 in [`map::AUTH`].
    pub kind: u32,
}
const _: () = assert!(size_of::<AuthKey>() == 16);

/// Port ranges an auth entry can carry; a grant needing more is refused by the policy loader.
pub const MAX_PORT_RANGES: usize = 8;

/// Destination ports `first..=last` (host byte order) of protocol `proto` (0: TCP and UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<PortRange>() == 8);

impl PortRange {
    #[inline(always)]
    #[must_use]
    pub const fn admits(&self, proto: u8, port: u16) -> bool {
        (self.proto == 0 || self.proto == proto) && self.first <= port && port <= self.last
    }
}

/// [`AuthValue::flags`]: new connections *to* the local workload are admitted on every port.
pub const AUTH_ALL_PORTS: u32 = 1;
/// [`AuthValue::flags`]: the entry holds pair keys ([`EntryKeys`]): SYNs of the pair are signed
/// and, in MAC mode `require`, checked. Without it (an entry written by hand with
/// `portcullis auth allow`) the pair is admitted by address alone.
pub const AUTH_KEYED: u32 = 2;
/// [`AuthValue::flags`]: [`EntryKeys::sign_previous`] and [`EntryKeys::verify_previous`] hold
/// the keys of the proof before (a zero key is never tried).
pub const AUTH_PREVIOUS_KEYS: u32 = 4;
/// [`AuthValue::flags`]: [`EntryKeys::verify_older`] holds the verify key of the proof before
/// that.
pub const AUTH_OLDER_KEY: u32 = 8;

/// The keys the latest proofs of a pair derived (see `docs/PROTOCOL.md`), as the kernel uses
/// them. When both agents prove a pair at once, each writes the two proofs in its own order,
/// so their "previous" proofs may differ: a verifier that also keeps the proof before
/// accepts whatever the other side signs with, whatever the order was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EntryKeys {
    /// `CLOCK_BOOTTIME` nanoseconds from which SYNs are signed with [`Self::sign`]; before
    /// it, with [`Self::sign_previous`] (when [`AUTH_PREVIOUS_KEYS`]), so that the peer, which
    /// writes its entry of the same proof a moment later or earlier, can verify every SYN.
    pub sign_from_ns: u64,
    /// MACs of SYNs the local workload sends to the remote one.
    pub sign: [u8; mac::KEY_LEN],
    pub sign_previous: [u8; mac::KEY_LEN],
    /// MACs of SYNs the remote workload sends to the local one.
    pub verify: [u8; mac::KEY_LEN],
    pub verify_previous: [u8; mac::KEY_LEN],
    pub verify_older: [u8; mac::KEY_LEN],
}
const _: () = assert!(size_of::<EntryKeys>() == 88);

impl EntryKeys {
    /// The key a SYN sent at `boot_ns` is signed with (`flags`: the entry's).
    #[inline(always)]
    #[must_use]
    pub fn signing(&self, flags: u32, boot_ns: u64) -> &[u8; mac::KEY_LEN] {
        if flags & AUTH_PREVIOUS_KEYS != 0 && boot_ns < self.sign_from_ns {
            &self.sign_previous
        } else {
            &self.sign
        }
    }

    /// Whether `got` is the MAC of `msg` under one of the verify keys `flags` marks as held,
    /// the current one first: the others cost only SYNs signed across a new proof, and forged
    /// ones.
    #[inline(always)]
    #[must_use]
    pub fn verifies(&self, flags: u32, msg: &[u64; 6], got: u64) -> bool {
        mac::siphash24(&self.verify, msg) == got
            || (flags & AUTH_PREVIOUS_KEYS != 0
                && mac::siphash24(&self.verify_previous, msg) == got)
            || (flags & AUTH_OLDER_KEY != 0 && mac::siphash24(&self.verify_older, msg) == got)
    }
}

/// An auth entry's value: how long the pair is authenticated, and what the authorization
/// policy lets the remote workload open towards the local one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AuthValue {
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`) after which the entry no longer
    /// admits new connections.
    pub expires_ns: u64,
    /// `CLOCK_BOOTTIME` nanoseconds when it was written.
    pub created_ns: u64,
    /// `AUTH_*` bits.
    pub flags: u32,
    /// How many of `ports` are used. With neither this nor [`AUTH_ALL_PORTS`], the pair is
    /// authenticated but the remote may open nothing towards the local workload (the policy
    /// admits only the other direction).
    pub nports: u32,
    pub ports: [PortRange; MAX_PORT_RANGES],
    /// Meaningful with [`AUTH_KEYED`].
    pub keys: EntryKeys,
}
const _: () = assert!(size_of::<AuthValue>() == 176);

impl AuthValue {
    /// Whether a new connection of `proto` to local port `port` is admitted.
    #[inline(always)]
    #[must_use]
    pub fn admits(&self, proto: u8, port: u16) -> bool {
        if self.flags & AUTH_ALL_PORTS != 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if (i as u32) < self.nports && self.ports[i].admits(proto, port) {
                return true;
            }
            i += 1;
        }
        false
    }
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A connection seen from the local pod: the same key for both directions of the flow.
/// IPv4 addresses occupy the first four bytes; the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `AF_INET` (4) or `AF_INET6` (6).
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// [`FlowValue::flags`]: the remote peer opened the connection.
pub const FLOW_INBOUND: u32 = 1;
/// [`FlowValue::flags`]: the local pod opened the connection.
pub const FLOW_OUTBOUND: u32 = 2;
/// [`FlowValue::flags`]: admitted without authorization (mode `audit` or `off`): cut when the
/// local pod's mode becomes `enforce`.
pub const FLOW_UNCHECKED: u32 = 4;
/// [`FlowValue::flags`]: a connection from this node itself (admitted by the node-traffic
/// setting rather than an auth entry).
pub const FLOW_HOST: u32 = 8;

/// The identity pair a connection was admitted under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub local_identity: u32,
    /// [`IDENTITY_NONE`] for an outbound connection to an address outside cluster state.
    pub remote_identity: u32,
    pub remote_node: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub created_ns: u64,
    /// The interface of the local pod the flow was admitted on. A packet of a tracked flow on
    /// that interface passes without the endpoint lookup: the pod's address was checked against
    /// it when the flow was created, and the agent cuts the flow if the endpoint goes away.
    pub ifindex: u32,
    /// UDP flows: when a packet of the flow was last seen, in units of 2^30 ns (about a
    /// second) of `CLOCK_BOOTTIME` ([`seen_units`]); the agent cuts flows idle for longer than
    /// its UDP idle timeout. 0 for TCP flows.
    pub seen: u32,
}

/// `CLOCK_BOOTTIME` nanoseconds in [`FlowValue::seen`]'s units (a shift, cheap in the kernel).
#[inline(always)]
#[must_use]
pub const fn seen_units(boot_ns: u64) -> u32 {
    (boot_ns >> 30) as u32
}
const _: () = assert!(size_of::<FlowValue>() == 32);

impl FlowValue {
    /// The auth entry this flow depends on.
    #[must_use]
    pub const fn pair(&self) -> AuthKey {
        AuthKey {
            local_identity: self.local_identity,
            remote_identity: self.remote_identity,
            remote_node: self.remote_node,
            kind: 0,
        }
    }
}

/// [`Event::kind`]: a new inbound connection was dropped for want of a valid auth entry.
pub const EVENT_DENIED: u32 = 1;
/// [`Event::kind`]: a local pod opened a connection to an enrolled peer with no valid auth
/// entry: the agent should authenticate the pair now, before the peer drops the SYN.
pub const EVENT_AUTH_WANTED: u32 = 2;
/// [`Event::kind`]: mode `audit` admitted a new inbound connection that `enforce` would have
/// dropped; the reason is the drop reason.
pub const EVENT_WOULD_DROP: u32 = 3;

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// The [`Counter`] that explains it (for `EVENT_DENIED`, the drop reason).
    pub reason: u32,
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
    pub _pad: u32,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub time_ns: u64,
    pub flow: FlowKey,
}
const _: () = assert!(size_of::<Event>() == 72);

/// Per-reason packet counters, the index into [`map::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New inbound connection admitted by a valid auth entry.
    PassAuthenticated = 0,
    /// Packet of a tracked flow.
    PassFlow = 1,
    /// New outbound connection opened by the pod (recorded as a flow).
    PassOutbound = 2,
    /// ARP, ICMP, ICMPv6: not subject to authentication.
    PassControl = 3,
    /// New inbound connection without an auth entry for the pair.
    DropNoAuth = 4,
    /// New inbound connection whose pair's auth entry has expired.
    DropExpired = 5,
    /// Mid-connection packet without a flow entry (revoked, or never admitted).
    DropNoFlow = 6,
    /// From a pod, with a source address that is not that pod's.
    DropSpoofed = 7,
    /// New inbound connection from an address outside cluster state.
    DropUnknownPeer = 8,
    /// Could not be parsed (truncated, fragment, IPv6 extension header).
    DropMalformed = 9,
    /// An IP protocol or ethertype that is neither authenticated nor control traffic.
    DropUnsupported = 10,
    /// To a pod's interface, but not addressed to an enrolled local pod.
    DropNotLocal = 11,
    /// An event was suppressed by the per-pair rate limit.
    EventRateLimited = 12,
    /// An event was lost because the ring buffer was full.
    EventLost = 13,
    /// A flow could not be recorded (map update failed): the packet was dropped.
    DropFlowTableFull = 14,
    /// New inbound connection of an authenticated pair that the policy does not admit (port,
    /// protocol or direction), or from this node when node traffic is restricted.
    DropPolicy = 15,
    /// New inbound connection that `enforce` would drop, admitted by mode `audit`.
    PassAudit = 16,
    /// New inbound connection to a pod whose mode is `off`.
    PassUnenforced = 17,
    /// New inbound connection from this node itself (kubelet probes), admitted by policy.
    PassHost = 18,
    /// Another IP protocol, admitted by policy, or an ICMP error of a tracked flow.
    PassOther = 19,
    /// New inbound TCP connection of a keyed pair, in MAC mode `require`, whose SYN carries no
    /// connection MAC.
    DropNoMac = 20,
    /// New inbound TCP connection of a keyed pair, in MAC mode `require`, whose SYN's MAC does
    /// not verify with the pair's keys (forged, replayed for another connection, or stamped
    /// outside the time window).
    DropBadMac = 21,
    /// New outbound TCP connection of a keyed pair: its SYN was signed.
    PassSigned = 22,
    /// New outbound TCP connection of a keyed pair whose SYN could not be signed (no room for
    /// the option in its TCP header, or it carries data): it leaves unsigned, and the peer's
    /// MAC mode decides.
    PassUnsigned = 23,
}

impl Counter {
    pub const COUNT: u32 = 24;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::PassAuthenticated,
        Self::PassFlow,
        Self::PassOutbound,
        Self::PassControl,
        Self::DropNoAuth,
        Self::DropExpired,
        Self::DropNoFlow,
        Self::DropSpoofed,
        Self::DropUnknownPeer,
        Self::DropMalformed,
        Self::DropUnsupported,
        Self::DropNotLocal,
        Self::EventRateLimited,
        Self::EventLost,
        Self::DropFlowTableFull,
        Self::DropPolicy,
        Self::PassAudit,
        Self::PassUnenforced,
        Self::PassHost,
        Self::PassOther,
        Self::DropNoMac,
        Self::DropBadMac,
        Self::PassSigned,
        Self::PassUnsigned,
    ];

    /// The stable name used in status output and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassAuthenticated => "pass_authenticated",
            Self::PassFlow => "pass_flow",
            Self::PassOutbound => "pass_outbound",
            Self::PassControl => "pass_control",
            Self::DropNoAuth => "drop_no_auth",
            Self::DropExpired => "drop_expired",
            Self::DropNoFlow => "drop_no_flow",
            Self::DropSpoofed => "drop_spoofed",
            Self::DropUnknownPeer => "drop_unknown_peer",
            Self::DropMalformed => "drop_malformed",
            Self::DropUnsupported => "drop_unsupported",
            Self::DropNotLocal => "drop_not_local",
            Self::EventRateLimited => "event_rate_limited",
            Self::EventLost => "event_lost",
            Self::DropFlowTableFull => "drop_flow_table_full",
            Self::DropPolicy => "drop_policy",
            Self::PassAudit => "pass_audit",
            Self::PassUnenforced => "pass_unenforced",
            Self::PassHost => "pass_host",
            Self::PassOther => "pass_other",
            Self::DropNoMac => "drop_no_mac",
            Self::DropBadMac => "drop_bad_mac",
            Self::PassSigned => "pass_signed",
            Self::PassUnsigned => "pass_unsigned",
        }
    }

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        if v < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    #[must_use]
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropNoAuth
                | Self::DropExpired
                | Self::DropNoFlow
                | Self::DropSpoofed
                | Self::DropUnknownPeer
                | Self::DropMalformed
                | Self::DropUnsupported
                | Self::DropNotLocal
                | Self::DropFlowTableFull
                | Self::DropPolicy
                | Self::DropNoMac
                | Self::DropBadMac
        )
    }
}

/// [`NameKey::kind`] of an identity number.
pub const NAME_IDENTITY: u32 = 1;
/// [`NameKey::kind`] of a node number.
pub const NAME_NODE: u32 = 2;
/// [`NameKey::kind`] of the agent's next number of a kind (`id`: `NAME_IDENTITY` or
/// `NAME_NODE`; the name: the number in decimal), so that numbers reclaimed at the top are not
/// handed out again after a restart.
pub const NAME_NEXT: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NameKey {
    pub kind: u32,
    pub id: u32,
}
const _: () = assert!(size_of::<NameKey>() == 8);

/// Longest name stored: 2048 bytes is the SPIFFE ID limit.
pub const NAME_MAX: usize = 2048;

/// A UTF-8 name, `len` bytes of `bytes`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Name {
    pub len: u32,
    pub bytes: [u8; NAME_MAX],
}
const _: () = assert!(size_of::<Name>() == 4 + NAME_MAX);

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): `#[repr(C)]`, `Copy`, no implicit padding (checked by the size
    // assertions above), and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::AuthKey {}
    unsafe impl aya::Pod for super::AuthValue {}
    unsafe impl aya::Pod for super::EntryKeys {}
    unsafe impl aya::Pod for super::PortRange {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::NameKey {}
    unsafe impl aya::Pod for super::Name {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(offset_of!(FlowKey, local_port), 32);
        assert_eq!(offset_of!(FlowKey, proto), 36);
        assert_eq!(offset_of!(FlowKey, _pad), 38);
        assert_eq!(offset_of!(Event, time_ns), 24);
        assert_eq!(offset_of!(Event, flow), 32);
        assert_eq!(offset_of!(FlowValue, created_ns), 16);
        assert_eq!(offset_of!(FlowValue, seen), 28);
        assert_eq!(align_of::<Event>(), 8);
        assert_eq!(offset_of!(Name, bytes), 4);
        // The layout before pair keys is this one up to `keys`: an agent carries old entries
        // over by that prefix.
        assert_eq!(offset_of!(AuthValue, keys), 88);
        assert_eq!(offset_of!(EntryKeys, verify_older), 72);
    }

    #[test]
    fn counters_round_trip_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            assert_eq!(Counter::from_u32(i as u32), Some(*c));
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
        assert_eq!(Counter::from_u32(Counter::COUNT), None);
    }
}
