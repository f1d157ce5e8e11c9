//! Hand-made frames and packets for the tools that forge traffic (`probe inject`, `probe
//! replay`, `probe flood`, `forge`) and for the benchmarks' test runs: Ethernet, IPv4 and
//! IPv6 headers, TCP segments, UDP datagrams, Internet checksums under their pseudo-headers,
//! TCP/IPv4 frames cut back into their parts, and AF_PACKET sockets to write frames on an
//! interface and read what passes it.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Every protocol: an AF_PACKET socket of this one sees all frames.
pub const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;
pub const BROADCAST: [u8; 6] = [0xff; 6];

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
/// The fixed TCP header: 20 bytes, no options.
pub const TCP_LEN: u16 = 20;

/// The one's-complement sum (RFC 1071) of `parts` laid end to end, as big-endian 16-bit
/// words; every part but the last must be of even length.
pub fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut acc = 0u64;
    for w in parts.iter().flat_map(|p| p.chunks(2)) {
        acc += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `parts` (see [`ones_sum`]).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    !ones_sum(parts)
}

/// The pseudo-header of an upper-layer segment of `len` bytes of protocol `proto` from `src`
/// to `dst`: addresses, then a zero byte, the protocol and a 16-bit length for IPv4
/// (RFC 793), a 32-bit length, three zeros and the next header for IPv6 (RFC 8200, 8.1).
///
/// # Panics
/// If `src` and `dst` are of different families.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("pseudo_header: {src} and {dst} are of different families"),
    }
    p
}

/// The checksum of upper-layer `segment` (TCP, UDP, ICMPv6) of protocol `proto` from `src` to
/// `dst`, under its pseudo-header; the two bytes at `field` (the segment's checksum field) are
/// taken as zero, whatever they hold.
pub fn segment_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8], field: usize) -> u16 {
    let pseudo = pseudo_header(src, dst, proto, segment.len());
    checksum(&[&pseudo, &segment[..field], &[0, 0], &segment[field + 2..]])
}

/// The source and destination addresses of IP header `ip` (IPv4, or IPv6).
pub fn addresses(ip: &[u8]) -> (IpAddr, IpAddr) {
    if ip[0] >> 4 == 4 {
        let a = |at: usize| -> [u8; 4] { ip[at..at + 4].try_into().expect("4 bytes") };
        (Ipv4Addr::from(a(12)).into(), Ipv4Addr::from(a(16)).into())
    } else {
        let a = |at: usize| -> [u8; 16] { ip[at..at + 16].try_into().expect("16 bytes") };
        (Ipv6Addr::from(a(8)).into(), Ipv6Addr::from(a(24)).into())
    }
}

/// The checksum of TCP segment `tcp` (its checksum field taken as zero) under IP header `ip`
/// (IPv4, or IPv6 with no extension header).
pub fn tcp_checksum(ip: &[u8], tcp: &[u8]) -> u16 {
    let (src, dst) = addresses(ip);
    segment_checksum(src, dst, IPPROTO_TCP, tcp, 16)
}

/// Fills in the header checksum of IPv4 header `ip` (whatever its checksum field holds).
pub fn fill_ipv4_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&[ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// An IPv4 header (20 bytes, TTL 64, DF, identification `id`) for `payload_len` bytes of
/// protocol `proto`, its checksum filled in.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: u16, id: u16) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45; // version 4, 5 words
    ip[2..4].copy_from_slice(&(20 + payload_len).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6] = 0x40; // DF, fragment offset 0
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    fill_ipv4_checksum(&mut ip);
    ip
}

/// An IPv6 header (40 bytes, traffic class and flow label 0) for `payload_len` bytes behind
/// next header `next`.
pub fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    payload_len: u16,
    hop_limit: u8,
) -> [u8; 40] {
    let mut ip = [0u8; 40];
    ip[0] = 0x60; // version 6
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next;
    ip[7] = hop_limit;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip
}

/// `segment` of protocol `proto` (its checksum already filled in) behind an IPv4 header
/// ([`ipv4_header`], identification `id`) or an IPv6 header (hop limit 64).
///
/// # Panics
/// If `src` and `dst` are of different families.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, id: u16, segment: &[u8]) -> Vec<u8> {
    let len = u16::try_from(segment.len()).expect("a segment of less than 64 KiB");
    let mut pkt = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_header(s, d, proto, len, id).to_vec(),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_header(s, d, proto, len, 64).to_vec(),
        _ => panic!("ip_packet: {src} and {dst} are of different families"),
    };
    pkt.extend_from_slice(segment);
    pkt
}

/// One bare SYN from `src` to `dst`: an IPv4 header (TTL 64, DF, identification `id`) or an
/// IPv6 header (hop limit 64), then a 20-byte TCP header (window 64240, sequence number
/// `seq`), both checksums filled in.
///
/// # Panics
/// If `src` and `dst` are of different families.
pub fn syn_packet(src: SocketAddr, dst: SocketAddr, seq: u32, id: u16) -> Vec<u8> {
    syn_with_options(src, dst, seq, id, &[])
}

/// [`syn_packet`] with TCP options `options` (a multiple of 4 bytes, at most 40) after the
/// fixed header.
///
/// # Panics
/// If the families differ or `options` does not fit.
pub fn syn_with_options(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    id: u16,
    options: &[u8],
) -> Vec<u8> {
    let tcp = tcp_segment(src, dst, seq, 0, TCP_SYN, options);
    ip_packet(src.ip(), dst.ip(), IPPROTO_TCP, id, &tcp)
}

/// A TCP segment without payload from `src` to `dst`: sequence number `seq`, acknowledgment
/// number `ack`, flags `flags` (`TCP_*`), window 64240, then options `options` (a multiple
/// of 4 bytes, at most 40) after the fixed header; its checksum filled in.
///
/// # Panics
/// If the families differ or `options` does not fit.
pub fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "TCP options of {} bytes",
        options.len()
    );
    let mut tcp = vec![0u8; usize::from(TCP_LEN) + options.len()];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    // Data offset in 32-bit words.
    tcp[12] = ((tcp.len() / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[20..].copy_from_slice(options);
    let c = segment_checksum(src.ip(), dst.ip(), IPPROTO_TCP, &tcp, 16);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    tcp
}

/// The IPv4 header and TCP segment of an Ethernet frame, as [`tcp4_in_frame`] cuts them.
#[derive(Clone, Copy, Debug)]
pub struct Tcp4InFrame<'a> {
    /// The IPv4 header, its options included.
    pub ip: &'a [u8],
    /// The TCP segment (header, options, payload), as long as the IPv4 total length says.
    pub tcp: &'a [u8],
}

impl Tcp4InFrame<'_> {
    /// The TCP header's length (its data offset), options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.tcp[12] >> 4) * 4
    }

    /// The TCP options: the header past its fixed 20 bytes.
    pub fn options(&self) -> &[u8] {
        &self.tcp[usize::from(TCP_LEN)..self.header_len()]
    }

    /// Whether the IPv4 header checksum verifies.
    pub fn ip_checksum_ok(&self) -> bool {
        ones_sum(&[self.ip]) == 0xffff
    }

    /// Whether the TCP checksum verifies under the IPv4 pseudo-header.
    pub fn tcp_checksum_ok(&self) -> bool {
        let (src, dst) = addresses(self.ip);
        let pseudo = pseudo_header(src, dst, IPPROTO_TCP, self.tcp.len());
        ones_sum(&[&pseudo, self.tcp]) == 0xffff
    }
}

/// Cuts Ethernet `frame` into its IPv4 header and TCP segment, checking that both are whole
/// (as the IPv4 header length, total length and the TCP data offset say); the checksums are
/// not checked.
pub fn tcp4_in_frame(frame: &[u8]) -> anyhow::Result<Tcp4InFrame<'_>> {
    let tcp_len = usize::from(TCP_LEN);
    if frame.len() < ETH_HLEN + 20 + tcp_len || frame[12..14] != ETH_P_IP.to_be_bytes() {
        anyhow::bail!("not an IPv4 frame ({} bytes)", frame.len());
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || ip.len() < total || total < ihl + tcp_len || ip[9] != IPPROTO_TCP {
        anyhow::bail!("not a whole TCP/IPv4 packet (IHL {ihl}, total length {total})");
    }
    let seen = Tcp4InFrame {
        ip: &ip[..ihl],
        tcp: &ip[ihl..total],
    };
    let doff = seen.header_len();
    if doff < tcp_len || doff > seen.tcp.len() {
        anyhow::bail!("a TCP header of {doff} bytes");
    }
    Ok(seen)
}

/// An IPv4 (TTL 64, DF, identification 0) or IPv6 (hop limit 64) packet holding one UDP
/// datagram, checksums filled in.
///
/// # Panics
/// If `src` and `dst` are of different families, or `data` does not fit in a datagram.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let ulen = u16::try_from(8 + data.len()).expect("a small payload");
    let mut udp = Vec::with_capacity(usize::from(ulen));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    // A computed checksum of 0 is sent as 0xffff (0 means "none", forbidden over IPv6).
    let c = match segment_checksum(src.ip(), dst.ip(), IPPROTO_UDP, &udp, 6) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    ip_packet(src.ip(), dst.ip(), IPPROTO_UDP, 0, &udp)
}

/// A raw IP socket that sends whole packets (IP header included) to one destination, of the
/// destination's family. Needs CAP_NET_RAW.
pub struct RawIp {
    sock: Socket,
    dst: SockAddr,
}

impl RawIp {
    pub fn open(dst: IpAddr) -> io::Result<RawIp> {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        // IPPROTO_RAW implies IP_HDRINCL for IPv4; IPv6 needs IPV6_HDRINCL set.
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
            .map_err(|e| context("raw socket", e))?;
        if dst.is_ipv6() {
            sock.set_header_included_v6(true)
                .map_err(|e| context("IPV6_HDRINCL", e))?;
        }
        // Raw sockets take the port of the destination sockaddr as 0.
        let dst = SocketAddr::new(dst, 0).into();
        Ok(RawIp { sock, dst })
    }

    /// Sends `packet`, whose IP header must be of the destination's family.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.sock.send_to(packet, &self.dst).map(|_| ())
    }
}

/// `payload` behind an Ethernet header.
pub fn ethernet(dst: &[u8; 6], src: &[u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IP `packet` behind an Ethernet header, its ethertype that of the packet's version.
pub fn ip_frame(dst: &[u8; 6], src: &[u8; 6], packet: &[u8]) -> Vec<u8> {
    let ethertype = if packet[0] >> 4 == 6 {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    ethernet(dst, src, ethertype, packet)
}

/// A hardware address as text: `02:00:00:00:00:01`.
pub fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `e` with `what` before its message (its kind kept).
fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn last_os_error(what: &str) -> io::Error {
    context(what, io::Error::last_os_error())
}

/// A frame read by [`PacketSocket::recv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its length.
    pub len: usize,
    /// Whether the interface sent it (rather than received it).
    pub outgoing: bool,
}

/// A raw AF_PACKET socket bound to one interface and one ethertype (or [`ETH_P_ALL`]): it
/// writes whole frames (Ethernet header included) on the interface and reads those that pass
/// it, in both directions. Needs CAP_NET_RAW.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

impl PacketSocket {
    /// Its errors name the step that failed (`interface IF`, `AF_PACKET socket`, `hardware
    /// address of IF`, `binding to IF`).
    pub fn open(iface: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let name =
            CString::new(iface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(last_os_error(&format!("interface {iface}")));
        }
        let ifindex =
            i32::try_from(ifindex).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            )
        };
        if fd < 0 {
            return Err(last_os_error("AF_PACKET socket"));
        }
        // SAFETY: a fresh descriptor, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed C struct; the pointer passed matches the request.
        let mac = unsafe {
            let mut ifr: libc::ifreq = zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
                *d = *s as libc::c_char;
            }
            if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) != 0 {
                return Err(last_os_error(&format!("hardware address of {iface}")));
            }
            let sa = ifr.ifr_ifru.ifru_hwaddr.sa_data;
            [
                sa[0] as u8,
                sa[1] as u8,
                sa[2] as u8,
                sa[3] as u8,
                sa[4] as u8,
                sa[5] as u8,
            ]
        };
        let s = PacketSocket { fd, ifindex, mac };
        let mut sll = s.sockaddr(&[0; 6]);
        sll.sll_protocol = ethertype.to_be();
        // SAFETY: `sll` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                s.fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(last_os_error(&format!("binding to {iface}")));
        }
        Ok(s)
    }

    /// The interface's hardware address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn sockaddr(&self, mac: &[u8; 6]) -> libc::sockaddr_ll {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(mac);
        sll
    }

    /// Writes `frame` (Ethernet header included) on the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() < ETH_HLEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {} bytes", frame.len()),
            ));
        }
        let dst: [u8; 6] = frame[..6].try_into().expect("6 bytes");
        let mut sll = self.sockaddr(&dst);
        // Network byte order, as in the frame.
        sll.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        // SAFETY: `frame` is readable for its length; `sll` valid for the size given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(last_os_error(&format!(
                "sending on ifindex {}",
                self.ifindex
            )));
        }
        Ok(())
    }

    /// The next frame that passes the interface, into `buf`; `None` if none came within
    /// `timeout` (or the wait was interrupted).
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Received>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(context("poll", e));
        }
        if r == 0 {
            return Ok(None);
        }
        // SAFETY: a zeroed C struct and a writable buffer; the sizes passed match them.
        let (n, pkttype) = unsafe {
            let mut from: libc::sockaddr_ll = zeroed();
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&raw mut from).cast(),
                &mut len,
            );
            (n, from.sll_pkttype)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                return Ok(None);
            }
            return Err(context("recvfrom", e));
        }
        Ok(Some(Received {
            len: n as usize,
            outgoing: pkttype == libc::PACKET_OUTGOING,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // The usual worked example: 192.168.0.1 -> 192.168.0.199, UDP, length 0x73.
        let h = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 192, 168, 0, 1, 192, 168, 0, 199,
        ];
        assert_eq!(checksum(&[&h]), 0xb861);
    }

    #[test]
    fn ipv4_syn() {
        let (s, d) = (Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 9, 8, 7));
        let p = syn_packet(
            SocketAddr::new(s.into(), 12345),
            SocketAddr::new(d.into(), 80),
            0xdead_beef,
            0x1234,
        );
        assert_eq!(p.len(), 40);
        let (ip, tcp) = p.split_at(20);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
        assert_eq!(&ip[4..6], &[0x12, 0x34]);
        assert_eq!(&ip[6..8], &[0x40, 0], "DF, no fragment offset");
        assert_eq!((ip[8], ip[9]), (64, 6));
        assert_eq!(ones_sum(&[ip]), 0xffff, "IPv4 header checksum");
        assert_eq!(checksum(&[ip]), 0);
        assert_eq!(&ip[12..16], &s.octets());
        assert_eq!(&ip[16..20], &d.octets());
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 12345);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
        assert_eq!(&tcp[4..8], &0xdead_beefu32.to_be_bytes());
        assert_eq!(&tcp[8..12], &[0; 4]);
        assert_eq!(tcp[12], 0x50);
        assert_eq!(tcp[13], TCP_SYN, "SYN only");
        assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 64240);
        let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 6, 0, 20]].concat();
        assert_eq!(ones_sum(&[&pseudo, tcp]), 0xffff, "TCP checksum");
    }

    #[test]
    fn ipv6_syn() {
        let s: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let d: Ipv6Addr = "fd00:10::7".parse().unwrap();
        let p = syn_packet(
            SocketAddr::new(s.into(), 40000),
            SocketAddr::new(d.into(), 443),
            7,
            0,
        );
        assert_eq!(p.len(), 60);
        let (ip, tcp) = p.split_at(40);
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 20, "payload length");
        assert_eq!((ip[6], ip[7]), (6, 64), "next header TCP, hop limit 64");
        assert_eq!(&ip[8..24], &s.octets());
        assert_eq!(&ip[24..40], &d.octets());
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40000);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 443);
        assert_eq!(&tcp[4..8], &7u32.to_be_bytes());
        assert_eq!(tcp[13], TCP_SYN, "SYN only");
        let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 0, 0, 20, 0, 0, 0, 6]].concat();
        assert_eq!(ones_sum(&[&pseudo, tcp]), 0xffff, "TCP checksum");
        assert_eq!(checksum(&[&pseudo, tcp]), 0);
    }

    #[test]
    fn an_ack_in_a_frame_is_cut_and_its_checksums_verify() {
        let (s, d): (SocketAddr, SocketAddr) = (
            "198.18.1.2:1023".parse().unwrap(),
            "198.18.2.2:8082".parse().unwrap(),
        );
        let options = [1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8];
        let tcp = tcp_segment(s, d, 7, 0x0a0b_0c0d, TCP_ACK, &options);
        assert_eq!(&tcp[8..12], &0x0a0b_0c0du32.to_be_bytes());
        assert_eq!((tcp[12], tcp[13]), (0x80, TCP_ACK));
        let frame = ip_frame(
            &[2, 0, 0, 0, 0, 2],
            &[2, 0, 0, 0, 0, 1],
            &ip_packet(s.ip(), d.ip(), IPPROTO_TCP, 0, &tcp),
        );
        let seen = tcp4_in_frame(&frame).expect("a TCP/IPv4 frame");
        assert_eq!(
            (seen.ip.len(), seen.tcp, seen.header_len()),
            (20, &tcp[..], 32)
        );
        assert_eq!(seen.options(), &options);
        assert!(seen.ip_checksum_ok() && seen.tcp_checksum_ok());
        let mut bad = frame.clone();
        bad[ETH_HLEN + 20 + 4] ^= 1;
        let seen = tcp4_in_frame(&bad).expect("still a TCP/IPv4 frame");
        assert!(seen.ip_checksum_ok() && !seen.tcp_checksum_ok());
        assert!(tcp4_in_frame(&frame[..ETH_HLEN + 40]).is_err(), "cut short");
        let udp = udp_packet(s, d, b"hi");
        assert!(tcp4_in_frame(&ip_frame(&[2; 6], &[2; 6], &udp)).is_err());
    }

    #[test]
    fn udp_datagram_checksums_verify() {
        let p = udp_packet(
            "198.18.1.2:40000".parse().unwrap(),
            "198.18.2.2:5300".parse().unwrap(),
            b"hello",
        );
        assert_eq!(p.len(), 20 + 8 + 5);
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum");
        let pseudo = [&p[12..20], &[0, 17, 0, 13][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "UDP checksum");
        let p = udp_packet(
            "[fd00:18:1::2]:40000".parse().unwrap(),
            "[fd00:18:2::2]:5300".parse().unwrap(),
            b"hi",
        );
        assert_eq!(p.len(), 40 + 8 + 2);
        let pseudo = [&p[8..40], &[0, 0, 0, 10, 0, 0, 0, 17][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0, "UDP checksum");
    }
}
