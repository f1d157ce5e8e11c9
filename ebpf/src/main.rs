//! portcullis's kernel programs, attached with TCX links to the host-side interface of every
//! enrolled local pod:
//!
//! - `pc_to_pod` (tc egress of that interface, i.e. packets on their way *into* the pod):
//!   a new connection is admitted only if the pair `(local identity, remote identity, remote
//!   node)` has a valid auth entry; later packets only while the connection's flow entry exists.
//!   A new TCP connection of a keyed pair must also carry a connection MAC that the source pod's
//!   own node computed with the pair's key (`portcullis_common::mac`).
//! - `pc_from_pod` (tc ingress, packets the pod sends): anti-spoofing (control packets too),
//!   flow bookkeeping for connections the pod opens, and the connection MAC of its SYNs.
//!
//! Fail closed: whatever cannot be classified is dropped and counted, never passed.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_PSEUDO_HDR, BPF_SOCK_OPS_TIMEOUT_INIT, TC_ACT_SHOT,
        tcx_action_base::TCX_NEXT,
    },
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockOpsContext, TcContext},
};
use aya_log_ebpf::debug;
use portcullis_common::{
    AUTH_KEYED, AuthKey, AuthValue, Counter, EP_ADMIT_HOST, EP_AUDIT, EP_ENFORCE, EP_HOST,
    EP_LOCAL, EP_MAC_AUDIT, EP_MAC_REQUIRE, EP_OTHER_PASS, EP_UDP_NODE_LOCAL, EVENT_AUTH_WANTED,
    EVENT_DENIED, EVENT_INTERVAL_NS, EVENT_WOULD_DROP, Endpoint, EntryKeys, Event, FLOW_HOST,
    FLOW_INBOUND, FLOW_OUTBOUND, FLOW_STAT_RECORDED, FLOW_STAT_REPLACED, FLOW_STATS,
    FLOW_UNCHECKED, FlowKey, FlowValue, IDENTITY_NONE, IPPROTO_TCP, IPPROTO_UDP, Name, NameKey,
    capacity,
    mac::{self, OPTION_LEN, Syn, TCP_MAX_HEADER},
    seen_units,
};

use crate::packet::{Control, ETH_HLEN, ICMP_ERROR, ICMP_NONE, Packet, Parsed, load};

/// Exact addresses (every endpoint is one /32 or /128): a hash lookup costs a fraction of an
/// LPM trie walk, on every packet.
#[map(name = "PC_EP_V4")]
static EP_V4: HashMap<[u8; 4], Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map(name = "PC_EP_V6")]
static EP_V6: HashMap<[u8; 16], Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map(name = "PC_AUTH")]
static AUTH: HashMap<AuthKey, AuthValue> = HashMap::pinned(capacity::AUTH, 0);
#[map(name = "PC_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(capacity::FLOWS, 0);
#[map(name = "PC_EV_RATE")]
static EVENT_RATE: LruHashMap<AuthKey, u64> = LruHashMap::pinned(capacity::EVENT_RATE, 0);
#[map(name = "PC_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
#[map(name = "PC_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);
/// Not used by the programs: declared here so that it is created and pinned with the others
/// (`BPF_F_NO_PREALLOC`: entries are 2 KiB, allocate only what is used).
#[map(name = "PC_NAMES")]
static NAMES: HashMap<NameKey, Name> = HashMap::pinned(capacity::NAMES, BPF_F_NO_PREALLOC);

#[map(name = "PC_SYN_RTO")]
static SYN_RTO: Array<u32> = Array::pinned(1, 0);
#[map(name = "PC_FLOW_STATS")]
static FLOW_STATS_MAP: PerCpuArray<u64> = PerCpuArray::pinned(FLOW_STATS, 0);
#[map(name = "PC_CLOCK")]
static CLOCK: Array<u64> = Array::pinned(1, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// tc verdicts. A pass is `TCX_NEXT` (-1, i.e. `TC_ACT_UNSPEC`), not `TC_ACT_OK`: our links
/// come first in the interface's TCX chain, and any verdict but `TCX_NEXT` ends the chain, so
/// `TC_ACT_OK` would skip the CNI's programs after ours (its policy, its NAT) and even its
/// classic tc filters. With `TCX_NEXT` the next program runs; when ours is the last one, the
/// kernel runs the classic tc filters if there are any, and otherwise passes the packet
/// (`tcx_run`, `sch_handle_ingress` and `sch_handle_egress` in net/core/dev.c,
/// `tcx_action_code` in include/net/tcx.h:
/// <https://github.com/torvalds/linux/blob/v6.6/net/core/dev.c>). A drop, `TC_ACT_SHOT`, ends
/// the chain: nothing after us sees the packet.
const PASS: i32 = TCX_NEXT;
const DROP: i32 = TC_ACT_SHOT as i32;

#[classifier]
pub fn pc_to_pod(ctx: TcContext) -> i32 {
    let verdict = match Packet::parse(&ctx) {
        Ok(Parsed::Ip(pkt)) => to_pod(&ctx, &pkt),
        Ok(Parsed::Control(_)) => Counter::PassControl,
        Ok(Parsed::Unsupported) => Counter::DropUnsupported,
        // Fail closed: a packet towards an enrolled pod that cannot be parsed is dropped.
        Err(()) => Counter::DropMalformed,
    };
    finish(&ctx, verdict)
}

#[classifier]
pub fn pc_from_pod(ctx: TcContext) -> i32 {
    let verdict = match Packet::parse(&ctx) {
        Ok(Parsed::Ip(pkt)) => from_pod(&ctx, &pkt),
        Ok(Parsed::Control(c)) => control_from_pod(&ctx, &c),
        Ok(Parsed::Unsupported) => Counter::DropUnsupported,
        Err(()) => Counter::DropMalformed,
    };
    finish(&ctx, verdict)
}

/// Counts the verdict and turns it into a tc action: the one place a verdict becomes an action.
#[inline(always)]
fn finish(ctx: &TcContext, verdict: Counter) -> i32 {
    count(verdict);
    if verdict.is_drop() {
        debug!(ctx, "portcullis: drop, reason {}", verdict as u32);
        DROP
    } else {
        PASS
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_flow(stat: u32) {
    if let Some(slot) = FLOW_STATS_MAP.get_ptr_mut(stat) {
        // SAFETY: as for `count`.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn endpoint(pkt: &Packet, addr: &[u8; 16]) -> Option<Endpoint> {
    endpoint_of(pkt.is_v6(), addr)
}

#[inline(always)]
fn endpoint_of(v6: bool, addr: &[u8; 16]) -> Option<Endpoint> {
    // SAFETY (both): the value is copied out at once; a concurrent update at worst gives the
    // old or the new endpoint.
    if v6 {
        unsafe { EP_V6.get(addr) }.copied()
    } else {
        unsafe { EP_V4.get(&[addr[0], addr[1], addr[2], addr[3]]) }.copied()
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context of a tc program is a `__sk_buff`; `ifindex` is readable.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions. BOOTTIME keeps counting across suspend, like the
    // wall clock the agent derives expiries from.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// `CLOCK_REALTIME` nanoseconds, from the boot clock and the offset the agent keeps.
#[inline(always)]
fn realtime(boot_ns: u64) -> u64 {
    boot_ns.wrapping_add(CLOCK.get(0).copied().unwrap_or(0))
}

/// The local pod's endpoint, if `addr` is an enrolled pod behind this very interface.
#[inline(always)]
fn local_endpoint(ctx: &TcContext, pkt: &Packet, addr: &[u8; 16]) -> Option<Endpoint> {
    local_endpoint_of(ctx, pkt.is_v6(), addr)
}

#[inline(always)]
fn local_endpoint_of(ctx: &TcContext, v6: bool, addr: &[u8; 16]) -> Option<Endpoint> {
    endpoint_of(v6, addr).filter(|ep| ep.flags & EP_LOCAL != 0 && ep.ifindex == ifindex(ctx))
}

/// ARP, neighbour discovery and MLD from a pod: an address it claims must be its own, like the
/// source of every other packet it sends.
#[inline(always)]
fn control_from_pod(ctx: &TcContext, c: &Control) -> Counter {
    match c.sender() {
        None => Counter::PassControl,
        Some(addr) if local_endpoint_of(ctx, c.is_v6(), &addr).is_some() => Counter::PassControl,
        Some(_) => Counter::DropSpoofed,
    }
}

/// Whether the packet is TCP or UDP (not an ICMP message or another protocol): the protocols
/// with flows.
#[inline(always)]
fn has_flow(pkt: &Packet) -> bool {
    pkt.icmp == ICMP_NONE && (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP)
}

/// What the flow table holds for a packet's key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// No entry.
    No,
    /// An entry made on another interface (a pod that has since been replaced by one with the
    /// same address): it does not admit this packet.
    Elsewhere,
    /// A flow admitted on this interface.
    Here,
}

/// Looks `key` up. A UDP flow of this interface is marked as seen now, so that the agent can
/// tell idle ones (UDP has no end of connection) from live ones.
#[inline(always)]
fn tracked(ctx: &TcContext, key: &FlowKey) -> Tracked {
    let Some(f) = FLOWS.get_ptr_mut(key) else {
        return Tracked::No;
    };
    // SAFETY: a valid map value pointer; a concurrent writer at worst stores the same second.
    unsafe {
        if (*f).ifindex != ifindex(ctx) {
            return Tracked::Elsewhere;
        }
        if key.proto == IPPROTO_UDP {
            let seen = seen_units(now());
            if (*f).seen != seen {
                (*f).seen = seen;
            }
        }
    }
    Tracked::Here
}

/// Records a flow, counting whether it replaced an entry of the same key (the agent tells the
/// LRU's evictions from its own removals with these counts).
#[inline(always)]
fn record(key: &FlowKey, flow: &FlowValue, existing: Tracked) -> bool {
    if FLOWS.insert(key, flow, 0).is_err() {
        return false;
    }
    count_flow(if existing == Tracked::No {
        FLOW_STAT_RECORDED
    } else {
        FLOW_STAT_REPLACED
    });
    true
}

/// Whether the pod's mode is `off`: it is not enforced, so its connections need no flow entry
/// (the table is shared by the node's pods: a busy unenforced pod such as a DNS server must
/// not evict the flows of enforced ones).
#[inline(always)]
fn unenforced(local: &Endpoint) -> bool {
    local.flags & (EP_ENFORCE | EP_AUDIT) == 0
}

/// Whether a TCP or UDP packet opens a connection (goes through admission) rather than
/// continuing one. Only a TCP SYN, or a UDP datagram with no flow, is new. A SYN always goes
/// through admission, even when a flow entry with the same 5-tuple survives from an earlier
/// connection: a reused port must not inherit an old admission. And a mid-connection packet
/// never creates an entry: a flow whose entry was deleted (revoked) stays cut in both directions.
#[inline(always)]
fn is_new(pkt: &Packet, tracked: bool) -> bool {
    if pkt.proto == IPPROTO_TCP {
        pkt.is_syn()
    } else {
        !tracked
    }
}

/// A packet that is neither TCP nor UDP, to or from local pod `local`: an ICMP error passes
/// when it quotes a tracked flow of that pod; anything else (ICMP echo, other IP protocols)
/// passes when the pod's policy says so. Mode `off` passes both, and mode `audit` passes what
/// `enforce` would drop, counted as `pass_audit`.
#[inline(always)]
fn other_protocol(ctx: &TcContext, pkt: &Packet, local: &Endpoint, to_pod: bool) -> Counter {
    if pkt.icmp == ICMP_ERROR {
        let Ok(key) = pkt.inner_flow(ctx, to_pod) else {
            return Counter::DropMalformed;
        };
        let pod = if to_pod { &pkt.dst } else { &pkt.src };
        return if key.local_addr == *pod && FLOWS.get_ptr(&key).is_some() {
            Counter::PassOther
        } else if local.flags & EP_AUDIT != 0 {
            Counter::PassAudit
        } else if local.flags & EP_ENFORCE == 0 {
            Counter::PassUnenforced
        } else {
            Counter::DropNoFlow
        };
    }
    if local.flags & EP_OTHER_PASS != 0 || local.flags & (EP_ENFORCE | EP_AUDIT) == 0 {
        Counter::PassOther
    } else if local.flags & EP_AUDIT != 0 {
        // Mode `audit` drops nothing that `enforce` alone would; the counter says what.
        Counter::PassAudit
    } else {
        Counter::DropUnsupported
    }
}

/// A packet on its way into a local pod: `dst` is the pod, `src` the remote peer.
#[inline(always)]
fn to_pod(ctx: &TcContext, pkt: &Packet) -> Counter {
    // The common case first: a packet of an established flow of this interface's pod.
    let key = pkt.flow_key(false);
    let existing = if has_flow(pkt) {
        tracked(ctx, &key)
    } else {
        Tracked::No
    };
    let new = is_new(pkt, existing == Tracked::Here);
    if existing == Tracked::Here && !new {
        return Counter::PassFlow;
    }
    let Some(local) = local_endpoint(ctx, pkt, &pkt.dst) else {
        return Counter::DropNotLocal;
    };
    if !has_flow(pkt) {
        return other_protocol(ctx, pkt, &local, true);
    }
    if unenforced(&local) {
        return Counter::PassUnenforced;
    }
    if !new {
        return Counter::DropNoFlow;
    }
    let now = now();
    let remote = endpoint(pkt, &pkt.src);
    let (remote_identity, remote_node, remote_flags) = match remote {
        Some(r) => (r.identity, r.node, r.flags),
        None => (IDENTITY_NONE, 0, 0),
    };
    let pair = AuthKey {
        local_identity: local.identity,
        remote_identity,
        remote_node,
        kind: 0,
    };
    let mut flags = FLOW_INBOUND;
    // Whether a drop is enforced, or only reported (mode `audit`, of the policy or of the MAC).
    let mut enforced = local.flags & EP_ENFORCE != 0;
    let verdict = if remote.is_none() {
        Counter::DropUnknownPeer
    } else if remote_flags & EP_HOST != 0 {
        flags |= FLOW_HOST;
        if local.flags & EP_ADMIT_HOST != 0 {
            Counter::PassHost
        } else {
            Counter::DropPolicy
        }
    } else {
        // SAFETY: the value is read in place, at once; a concurrent update at worst gives the
        // old or the new entry's fields.
        match unsafe { AUTH.get(&pair) } {
            Some(auth) if auth.expires_ns <= now => Counter::DropExpired,
            Some(auth) if !auth.admits(pkt.proto, pkt.dport) => Counter::DropPolicy,
            Some(_)
                if pkt.proto == IPPROTO_UDP
                    && local.flags & EP_UDP_NODE_LOCAL != 0
                    && remote_flags & EP_LOCAL == 0 =>
            {
                Counter::DropPolicy
            }
            Some(auth)
                if pkt.proto == IPPROTO_TCP
                    && auth.flags & AUTH_KEYED != 0
                    && local.flags & (EP_MAC_REQUIRE | EP_MAC_AUDIT) != 0 =>
            {
                enforced &= local.flags & EP_MAC_REQUIRE != 0;
                check_mac(ctx, pkt, &auth.keys, auth.flags, now)
            }
            Some(_) => Counter::PassAuthenticated,
            None => Counter::DropNoAuth,
        }
    };
    let verdict = if verdict.is_drop() {
        if enforced {
            signal(EVENT_DENIED, verdict, &pair, &key, now);
            return verdict;
        }
        // Mode `audit` (the policy's or the MAC's): admit, and report what `enforce` would
        // have done.
        signal(EVENT_WOULD_DROP, verdict, &pair, &key, now);
        flags |= FLOW_UNCHECKED;
        Counter::PassAudit
    } else {
        verdict
    };
    let flow = FlowValue {
        local_identity: local.identity,
        remote_identity,
        remote_node,
        flags,
        created_ns: now,
        ifindex: ifindex(ctx),
        seen: if pkt.proto == IPPROTO_UDP {
            seen_units(now)
        } else {
            0
        },
    };
    if !record(&key, &flow, existing) {
        return Counter::DropFlowTableFull;
    }
    verdict
}

/// A packet the pod sends: `src` must be the pod, `dst` is the remote peer.
#[inline(always)]
fn from_pod(ctx: &TcContext, pkt: &Packet) -> Counter {
    // A tracked flow of this interface has this pod's address as its source: no spoofing check
    // beyond the flow lookup is needed.
    let key = pkt.flow_key(true);
    let existing = if has_flow(pkt) {
        tracked(ctx, &key)
    } else {
        Tracked::No
    };
    let new = is_new(pkt, existing == Tracked::Here);
    if existing == Tracked::Here && !new {
        return Counter::PassFlow;
    }
    let Some(local) = local_endpoint(ctx, pkt, &pkt.src) else {
        return Counter::DropSpoofed;
    };
    if !has_flow(pkt) {
        return other_protocol(ctx, pkt, &local, false);
    }
    let off = unenforced(&local);
    if !new {
        return if off {
            Counter::PassUnenforced
        } else {
            Counter::DropNoFlow
        };
    }
    let now = now();
    let (remote_identity, remote_node, remote_flags) = match endpoint(pkt, &pkt.dst) {
        Some(remote) => (remote.identity, remote.node, remote.flags),
        None => (IDENTITY_NONE, 0, 0),
    };
    let mut flags = FLOW_OUTBOUND;
    if remote_flags & EP_HOST != 0 {
        flags |= FLOW_HOST;
    }
    let flow = FlowValue {
        local_identity: local.identity,
        remote_identity,
        remote_node,
        flags,
        created_ns: now,
        ifindex: ifindex(ctx),
        seen: if pkt.proto == IPPROTO_UDP {
            seen_units(now)
        } else {
            0
        },
    };
    // A pod in mode `off` is admitted everything both ways: its connections need no entry.
    if !off && !record(&key, &flow, existing) {
        return Counter::DropFlowTableFull;
    }
    if remote_identity != IDENTITY_NONE && remote_flags & EP_HOST == 0 {
        let pair = flow.pair();
        // SAFETY: as in `to_pod`.
        match unsafe { AUTH.get(&pair) } {
            Some(a) if a.expires_ns > now => {
                if pkt.proto == IPPROTO_TCP && a.flags & AUTH_KEYED != 0 {
                    return sign(ctx, pkt, &a.keys, a.flags, now);
                }
            }
            // The peer's agent will drop this SYN until the pair is authenticated: tell ours
            // now, so the handshake starts at connect() time rather than after a drop.
            _ => signal(EVENT_AUTH_WANTED, Counter::PassOutbound, &pair, &key, now),
        }
    }
    Counter::PassOutbound
}

/// What a SYN's MAC covers, stamped `time`.
#[inline(always)]
fn syn_of(pkt: &Packet, time: u32) -> Syn {
    Syn {
        family: pkt.family,
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        seq: pkt.seq,
        time,
    }
}

/// Whether the SYN of a keyed pair carries a MAC that verifies: our option, the last bytes of
/// its TCP header, stamped within the window, under one of the pair's last three keys.
#[inline(always)]
fn check_mac(ctx: &TcContext, pkt: &Packet, keys: &EntryKeys, flags: u32, now: u64) -> Counter {
    if pkt.tcp_len < 20 + OPTION_LEN {
        return Counter::DropNoMac;
    }
    // Through the helper: the verifier cannot follow a direct read at an offset this variable
    // (LLVM checks the bound on one pointer and reads through another).
    let Ok(bytes) = ctx.load::<[u8; OPTION_LEN]>(pkt.l4_off + pkt.tcp_len - OPTION_LEN) else {
        return Counter::DropNoMac;
    };
    let Some((time, got)) = mac::parse(&bytes) else {
        return Counter::DropNoMac;
    };
    if !mac::fresh(time, mac::time_units(realtime(now))) {
        return Counter::DropBadMac;
    }
    if keys.verifies(flags, &mac::message(&syn_of(pkt, time)), got) {
        Counter::PassAuthenticated
    } else {
        Counter::DropBadMac
    }
}

/// Appends the connection MAC to a SYN the pod sends to a keyed peer: the packet grows by
/// the option at the end of its TCP header, and the lengths and checksums follow. A SYN with
/// no room for the option, or with data (TCP Fast Open), leaves unsigned and is counted; the
/// peer's MAC mode decides it. A failure after the packet grew drops it: it must not be
/// delivered with the new bytes taken for data.
#[inline(always)]
fn sign(ctx: &TcContext, pkt: &Packet, keys: &EntryKeys, flags: u32, now: u64) -> Counter {
    let end = pkt.l4_off + pkt.tcp_len;
    if pkt.tcp_len < 20 || pkt.tcp_len + OPTION_LEN > TCP_MAX_HEADER || end != pkt.ip_end {
        return Counter::PassUnsigned;
    }
    let option = mac::option(
        keys.signing(flags, now),
        &syn_of(pkt, mac::time_units(realtime(now))),
    );
    // Read before the packet changes: the 32-bit word holding the data offset.
    let Ok(word) = load::<[u8; 4]>(ctx, pkt.l4_off + 12) else {
        return Counter::PassUnsigned;
    };
    if ctx.change_tail((end + OPTION_LEN) as u32, 0).is_err() {
        return Counter::PassUnsigned;
    }
    if grow_header(ctx, pkt, &option, word).is_err() {
        return Counter::DropMalformed;
    }
    Counter::PassSigned
}

/// Writes `option` into the room `sign` made and fixes the TCP data offset, the IP length,
/// and both checksums: one difference for the header's new bytes, one for the pseudo-header's
/// length (a checksum the device completes, `CHECKSUM_PARTIAL`, takes only the latter: the
/// helper knows).
#[inline(always)]
fn grow_header(
    ctx: &TcContext,
    pkt: &Packet,
    option: &[u8; OPTION_LEN],
    word: [u8; 4],
) -> Result<(), i64> {
    let end = pkt.l4_off + pkt.tcp_len;
    let check = pkt.l4_off + 16;
    let new_word = [
        (((pkt.tcp_len + OPTION_LEN) / 4) as u8) << 4 | (word[0] & 0x0f),
        word[1],
        word[2],
        word[3],
    ];
    ctx.store(end, option, 0)?;
    ctx.store(pkt.l4_off + 12, &new_word, 0)?;
    let w = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut from = [w(&word, 0)];
    let mut to = [
        w(&new_word, 0),
        w(option, 0),
        w(option, 4),
        w(option, 8),
        w(option, 12),
    ];
    // SAFETY: both buffers are on the stack, of the sizes given (multiples of 4).
    let diff = unsafe {
        aya_ebpf::helpers::bpf_csum_diff(
            from.as_mut_ptr(),
            4,
            to.as_mut_ptr(),
            (to.len() * 4) as u32,
            0,
        )
    };
    if diff < 0 {
        return Err(diff);
    }
    ctx.l4_csum_replace(check, 0, diff as u64, 0)?;
    let grown = OPTION_LEN as u16;
    if pkt.is_v6() {
        let payload = (pkt.ip_end - ETH_HLEN - 40) as u16;
        ctx.store(ETH_HLEN + 4, &(payload + grown).to_be_bytes(), 0)?;
        // The pseudo-header's upper-layer length is 32 bits.
        let (from, to) = (pkt.tcp_len as u32, (pkt.tcp_len + OPTION_LEN) as u32);
        ctx.l4_csum_replace(
            check,
            u64::from(from.to_be()),
            u64::from(to.to_be()),
            u64::from(BPF_F_PSEUDO_HDR) | 4,
        )?;
    } else {
        let total = (pkt.ip_end - ETH_HLEN) as u16;
        ctx.store(ETH_HLEN + 2, &(total + grown).to_be_bytes(), 0)?;
        ctx.l3_csum_replace(
            ETH_HLEN + 10,
            u64::from(total.to_be()),
            u64::from((total + grown).to_be()),
            2,
        )?;
        let (from, to) = (pkt.tcp_len as u16, (pkt.tcp_len + OPTION_LEN) as u16);
        ctx.l4_csum_replace(
            check,
            u64::from(from.to_be()),
            u64::from(to.to_be()),
            u64::from(BPF_F_PSEUDO_HDR) | 2,
        )?;
    }
    Ok(())
}

/// sockops on the pods' cgroup. At `TIMEOUT_INIT` (a pod's `connect()`, before its SYN
/// leaves), a connection from a local pod to an enrolled peer whose pair has no valid auth entry
/// gets a short initial retransmission timeout: the peer drops the first SYN while the agents
/// authenticate the pair (the "auth wanted" event starts that at the same moment), and the
/// retransmission comes after milliseconds instead of the kernel's 1 s. Everything else keeps the
/// kernel's timeout. Always returns 1: sockops programs cannot refuse anything here.
#[sock_ops]
pub fn pc_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TIMEOUT_INIT {
        return 1;
    }
    let rto = match SYN_RTO.get(0) {
        Some(r) if *r > 0 => *r,
        _ => return 1,
    };
    let (local, remote) = match ctx.family() {
        AF_INET => {
            let l = ctx.local_ip4().to_ne_bytes();
            let r = ctx.remote_ip4().to_ne_bytes();
            // SAFETY: values copied out at once.
            unsafe { (EP_V4.get(&l).copied(), EP_V4.get(&r).copied()) }
        }
        AF_INET6 => {
            let (l, r) = (ctx.local_ip6(), ctx.remote_ip6());
            // SAFETY: values copied out at once.
            unsafe {
                (
                    EP_V6.get(&ip6_bytes(l)).copied(),
                    EP_V6.get(&ip6_bytes(r)).copied(),
                )
            }
        }
        _ => return 1,
    };
    let (Some(local), Some(remote)) = (local, remote) else {
        return 1;
    };
    if local.flags & EP_LOCAL == 0 || remote.flags & EP_HOST != 0 {
        return 1;
    }
    let pair = AuthKey {
        local_identity: local.identity,
        remote_identity: remote.identity,
        remote_node: remote.node,
        kind: 0,
    };
    let authenticated = matches!(unsafe { AUTH.get(&pair) }, Some(a) if a.expires_ns > now());
    if !authenticated {
        ctx.set_reply(rto);
    }
    1
}

/// An IPv6 address from sockops' four network-order words.
#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Sends an event to the agent, at most one per pair and kind every `EVENT_INTERVAL_NS`.
#[inline(always)]
fn signal(kind: u32, reason: Counter, pair: &AuthKey, flow: &FlowKey, now: u64) {
    let rate_key = AuthKey { kind, ..*pair };
    if let Some(last) = EVENT_RATE.get_ptr_mut(&rate_key) {
        // SAFETY: a valid map value pointer; a racing writer on another CPU at worst lets one
        // extra event through.
        unsafe {
            if now.wrapping_sub(*last) < EVENT_INTERVAL_NS {
                count(Counter::EventRateLimited);
                return;
            }
            *last = now;
        }
    } else if EVENT_RATE.insert(&rate_key, &now, 0).is_err() {
        // The rate table is an LRU: insertion only fails on allocation failure. Do not let
        // that turn into an unlimited stream of events.
        count(Counter::EventRateLimited);
        return;
    }
    // Written in place in the ring buffer: an `Event` on the stack would not fit beside the
    // packet path's own frame.
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count(Counter::EventLost);
        return;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` points to a reserved, writable record of `size_of::<Event>()` bytes;
    // every field is written before it is submitted.
    unsafe {
        (*event).kind = kind;
        (*event).reason = reason as u32;
        (*event).local_identity = pair.local_identity;
        (*event).remote_identity = pair.remote_identity;
        (*event).remote_node = pair.remote_node;
        (*event)._pad = 0;
        (*event).time_ns = now;
        (*event).flow = *flow;
    }
    slot.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
