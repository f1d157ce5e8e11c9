//! Packet parsing: every read goes through [`load`], which reads the skb's linear data directly
//! when it holds the bytes and falls back to `bpf_skb_load_bytes` (which also reaches paged
//! data) when it does not, so a header split across pages is read, not misparsed.

use core::{mem, ptr};

use aya_ebpf::programs::TcContext;
use portcullis_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_HOPOPTS: u8 = 0;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// [`Packet::icmp`]: not ICMP.
pub const ICMP_NONE: u8 = 0;
/// [`Packet::icmp`]: an ICMP or ICMPv6 error; [`Packet::inner`] is the packet it quotes.
pub const ICMP_ERROR: u8 = 1;
/// [`Packet::icmp`]: any other ICMP message (echo and the like): another protocol for policy.
pub const ICMP_OTHER: u8 = 2;

/// What the programs need to know about an IP packet.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    /// IPv4 addresses in the first four bytes, the rest zero.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order; zero for protocols without ports.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// TCP: the sequence number (host order) and the header's length in bytes.
    pub seq: u32,
    pub tcp_len: usize,
    /// Offset of the transport header, and of the end of the IP packet (its length says;
    /// anything after it is link padding).
    pub l4_off: usize,
    pub ip_end: usize,
    /// `ICMP_*`.
    pub icmp: u8,
    /// For an ICMP error, the offset of the IP header it quotes.
    pub inner_off: usize,
}

/// The sender of a control packet.
pub enum Control {
    /// ARP: the sender protocol address (`0.0.0.0` in a probe), in the maps' 16-byte form.
    Arp([u8; 16]),
    /// ICMPv6 neighbour discovery or MLD: the IPv6 source address.
    Nd([u8; 16]),
    /// ARP for another protocol than IPv4.
    Other,
}

impl Control {
    /// The address a pod sending this must own, in the maps' form: `None` when no address
    /// is claimed (unspecified, an ARP probe, ARP of another protocol) or the sender is
    /// link-local (such packets never leave the link).
    #[inline(always)]
    pub fn sender(&self) -> Option<[u8; 16]> {
        match self {
            Self::Arp(a) => (u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) != 0).then_some(*a),
            Self::Nd(a) => {
                let unspecified = u128::from_ne_bytes(*a) == 0;
                let link_local = a[0] == 0xfe && a[1] & 0xc0 == 0x80;
                (!unspecified && !link_local).then_some(*a)
            }
            Self::Other => None,
        }
    }

    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        matches!(self, Self::Nd(_))
    }
}

pub enum Parsed {
    /// TCP, UDP, ICMP, or another IP protocol: subject to the rules.
    Ip(Packet),
    /// ARP, and ICMPv6 neighbour discovery and multicast listener messages: needed for the
    /// network to work at all, carry no connection. They pass towards a pod; from a pod, only
    /// with the pod's own sender address (see [`Control`]).
    Control(Control),
    /// An ethertype that is neither IP nor ARP.
    Unsupported,
}

/// Reads a `T` at byte `off` of the packet: straight from the linear data when it holds those
/// bytes (headers nearly always are), else through `bpf_skb_load_bytes`, which also reaches
/// paged data. The direct read saves a helper call per header on every packet.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    let at = start + off;
    // At least 2: LLVM turns `at + 1 <= end` into `at < end`, from which the verifier grants no
    // readable bytes. A 1-byte read at the packet's very last byte takes the helper path.
    if at + mem::size_of::<T>().max(2) <= end {
        // SAFETY: `at .. at + size_of::<T>()` lies inside the skb's linear data, as the check
        // above (which the verifier also requires) establishes; `T` is plain bytes.
        Ok(unsafe { ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load(off).map_err(|_| ())
    }
}

/// An IPv4 address in the 16-byte form the maps use: the address, then zeros. Built as one
/// integer, because zeroing the tail of a byte array makes LLVM call a byte-at-a-time `memset`
/// subprogram on every packet.
#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_ne_bytes(addr)).to_ne_bytes()
}

impl Packet {
    #[inline(always)]
    const fn new(family: u8, proto: u8) -> Self {
        Self {
            family,
            proto,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            seq: 0,
            tcp_len: 0,
            l4_off: 0,
            ip_end: 0,
            icmp: ICMP_NONE,
            inner_off: 0,
        }
    }

    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Parsed, ()> {
        let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
        match ethertype {
            ETH_P_IP => Self::parse_v4(ctx),
            ETH_P_IPV6 => Self::parse_v6(ctx),
            ETH_P_ARP => Self::parse_arp(ctx),
            _ => Ok(Parsed::Unsupported),
        }
    }

    /// ARP over Ethernet: hardware type 1, protocol IPv4, 6- and 4-byte addresses; the sender
    /// protocol address is at bytes 14..18 of the ARP header. ARP for anything else carries no
    /// IPv4 sender to check.
    #[inline(always)]
    fn parse_arp(ctx: &TcContext) -> Result<Parsed, ()> {
        let arp: [u8; 18] = load(ctx, ETH_HLEN)?;
        if u16::from_be_bytes([arp[2], arp[3]]) != ETH_P_IP || arp[4] != 6 || arp[5] != 4 {
            return Ok(Parsed::Control(Control::Other));
        }
        Ok(Parsed::Control(Control::Arp(v4_mapped([
            arp[14], arp[15], arp[16], arp[17],
        ]))))
    }

    #[inline(always)]
    fn parse_v4(ctx: &TcContext) -> Result<Parsed, ()> {
        let hdr: [u8; 20] = load(ctx, ETH_HLEN)?;
        let ihl = usize::from(hdr[0] & 0x0f) * 4;
        if hdr[0] >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        let proto = hdr[9];
        // A non-first fragment carries no transport header: it cannot be attributed to a
        // connection, so it cannot be admitted.
        let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
        if frag_offset != 0 {
            return Err(());
        }
        let mut pkt = Packet::new(AF_INET, proto);
        pkt.ip_end = ETH_HLEN + usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        pkt.src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
        pkt.dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
        pkt.load_l4(ctx, ETH_HLEN + ihl)?;
        Ok(Parsed::Ip(pkt))
    }

    #[inline(always)]
    fn parse_v6(ctx: &TcContext) -> Result<Parsed, ()> {
        let hdr: [u8; 40] = load(ctx, ETH_HLEN)?;
        if hdr[0] >> 4 != 6 {
            return Err(());
        }
        // One hop-by-hop options header is followed, because MLD (ICMPv6 behind a router
        // alert option) needs it; other extension headers are not, and a packet whose next
        // header is not a transport protocol we know is dropped towards and from a pod.
        let mut proto = hdr[6];
        let mut l4 = ETH_HLEN + 40;
        if proto == IPPROTO_HOPOPTS {
            let ext: [u8; 2] = load(ctx, l4)?;
            proto = ext[0];
            l4 += (usize::from(ext[1]) + 1) * 8;
        }
        if proto == IPPROTO_ICMPV6 {
            let icmp_type: u8 = load(ctx, l4)?;
            // Multicast listener (130–132, 143) and neighbour discovery (133–137).
            if matches!(icmp_type, 130..=137 | 143) {
                let mut src = [0u8; 16];
                src.copy_from_slice(&hdr[8..24]);
                return Ok(Parsed::Control(Control::Nd(src)));
            }
        }
        let mut pkt = Packet::new(AF_INET6, proto);
        pkt.ip_end = ETH_HLEN + 40 + usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        pkt.src.copy_from_slice(&hdr[8..24]);
        pkt.dst.copy_from_slice(&hdr[24..40]);
        pkt.load_l4(ctx, l4)?;
        Ok(Parsed::Ip(pkt))
    }

    #[inline(always)]
    fn load_l4(&mut self, ctx: &TcContext, off: usize) -> Result<(), ()> {
        self.l4_off = off;
        match self.proto {
            IPPROTO_ICMP => {
                let icmp_type: u8 = load(ctx, off)?;
                // Destination unreachable, source quench, time exceeded, parameter problem.
                if matches!(icmp_type, 3 | 4 | 11 | 12) {
                    self.icmp = ICMP_ERROR;
                    self.inner_off = off + 8;
                } else {
                    self.icmp = ICMP_OTHER;
                }
            }
            IPPROTO_ICMPV6 => {
                let icmp_type: u8 = load(ctx, off)?;
                // Destination unreachable, packet too big, time exceeded, parameter problem.
                if matches!(icmp_type, 1..=4) {
                    self.icmp = ICMP_ERROR;
                    self.inner_off = off + 8;
                } else {
                    self.icmp = ICMP_OTHER;
                }
            }
            IPPROTO_TCP => {
                // Ports (4 bytes), sequence and ack numbers (8), data offset (1), flags (1).
                let l4: [u8; 14] = load(ctx, off)?;
                self.sport = u16::from_be_bytes([l4[0], l4[1]]);
                self.dport = u16::from_be_bytes([l4[2], l4[3]]);
                self.seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
                self.tcp_len = usize::from(l4[12] >> 4) * 4;
                self.tcp_flags = l4[13];
            }
            IPPROTO_UDP => {
                let l4: [u8; 4] = load(ctx, off)?;
                self.sport = u16::from_be_bytes([l4[0], l4[1]]);
                self.dport = u16::from_be_bytes([l4[2], l4[3]]);
            }
            _ => {}
        }
        Ok(())
    }

    /// The flow an ICMP error belongs to, seen from the local pod: the pod sent the quoted
    /// packet when the error travels to it (`to_pod`), and received it when the pod sends the
    /// error. Only TCP and UDP are quoted flows; IPv6 quotes without extension headers.
    #[inline(always)]
    pub fn inner_flow(&self, ctx: &TcContext, to_pod: bool) -> Result<FlowKey, ()> {
        let off = self.inner_off;
        let mut key = FlowKey {
            local_addr: [0; 16],
            remote_addr: [0; 16],
            local_port: 0,
            remote_port: 0,
            proto: 0,
            family: self.family,
            _pad: [0; 2],
        };
        let (src, dst, l4) = if self.is_v6() {
            let first: u8 = load(ctx, off)?;
            if first >> 4 != 6 {
                return Err(());
            }
            key.proto = load(ctx, off + 6)?;
            let src: [u8; 16] = load(ctx, off + 8)?;
            let dst: [u8; 16] = load(ctx, off + 24)?;
            (src, dst, off + 40)
        } else {
            let first: u8 = load(ctx, off)?;
            let ihl = usize::from(first & 0x0f) * 4;
            if first >> 4 != 4 || ihl < 20 {
                return Err(());
            }
            key.proto = load(ctx, off + 9)?;
            let s4: [u8; 4] = load(ctx, off + 12)?;
            let d4: [u8; 4] = load(ctx, off + 16)?;
            (v4_mapped(s4), v4_mapped(d4), off + ihl)
        };
        if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
            return Err(());
        }
        let ports: [u8; 4] = load(ctx, l4)?;
        let sport = u16::from_be_bytes([ports[0], ports[1]]);
        let dport = u16::from_be_bytes([ports[2], ports[3]]);
        if to_pod {
            (
                key.local_addr,
                key.remote_addr,
                key.local_port,
                key.remote_port,
            ) = (src, dst, sport, dport);
        } else {
            (
                key.local_addr,
                key.remote_addr,
                key.local_port,
                key.remote_port,
            ) = (dst, src, dport, sport);
        }
        Ok(key)
    }

    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.family == AF_INET6
    }

    /// A connection request: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// The flow key seen from the local pod, which is the source when `local_is_src`.
    #[inline(always)]
    pub fn flow_key(&self, local_is_src: bool) -> FlowKey {
        let (local_addr, remote_addr, local_port, remote_port) = if local_is_src {
            (self.src, self.dst, self.sport, self.dport)
        } else {
            (self.dst, self.src, self.dport, self.sport)
        };
        FlowKey {
            local_addr,
            remote_addr,
            local_port,
            remote_port,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}
