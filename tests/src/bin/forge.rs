//! `forge`: hand-made frames and packets for the anti-spoofing tests, run inside testbed
//! namespaces as root (it needs CAP_NET_RAW).
//!
//! Every mode is bounded in time and reports with JSON lines on stdout; failures exit 1, usage
//! errors exit 2.
//!
//! ```text
//! forge arp --dev IF --op request|reply --sender-ip A --target-ip B [--count N] [--wait-ms W]
//!     N ARP frames on IF (AF_PACKET), broadcast, sender hardware address IF's own, sender
//!     protocol address A (0.0.0.0: a probe), target protocol address B. Then, for W ms
//!     (default 1000 for requests, 0 for replies), counts the ARP replies that come back on IF
//!     from B to A. {"ok":true,"sent":N,"replies":K}.
//! forge nd --dev IF --kind ns|na|mld --src S [--target T] [--count N] [--marker M] [--wait-ms W]
//!     N ICMPv6 messages from IPv6 source S on IF (AF_PACKET), each carrying the 16-bit marker
//!     M (default 0) in its reserved field:
//!       ns   neighbour solicitation for T (default fe80::1) to T's solicited-node group,
//!            hop limit 255, source link-layer address option;
//!       na   unsolicited neighbour advertisement (override) for T (default S) to ff02::1,
//!            hop limit 255, target link-layer address option;
//!       mld  MLDv2 report (one record: change to exclude mode, group ff02::1:ff00:M) to
//!            ff02::16, hop limit 1, behind a hop-by-hop header with a router alert.
//!     For ns, then counts for W ms (default 1000; else 0) the neighbour advertisements for T
//!     that come back on IF. {"ok":true,"sent":N,"replies":K}.
//! forge icmp6-listen --dev IF [--seconds S]
//!     A raw ICMPv6 socket bound to IF: prints {"ok":true,"listening":IF}, then one line
//!     {"type":…,"src":…,"marker":…} per ICMPv6 message IF delivers to the local stack (what
//!     passed every program on the way), until S seconds (default 60) have passed.
//! forge udp --from ADDR:PORT --to ADDR:PORT --payload TEXT [--count N]
//!     N UDP datagrams with a forged source, through a raw IP socket (IP_HDRINCL).
//!     {"ok":true,"sent":N}.
//! forge udp-listen --port P [--seconds S]
//!     A dual-stack UDP socket on [::]:P: prints {"ok":true,"listening":…}, then one line
//!     {"from":…,"payload":…} per datagram received, until S seconds (default 60) have passed.
//! ```

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_HOPOPTS: u8 = 0;
const BROADCAST: [u8; 6] = [0xff; 6];

struct Args {
    mode: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let mode = it.next().ok_or("missing mode")?;
        let mut opts = HashMap::new();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            opts.insert(key.to_string(), v);
        }
        Ok(Args { mode, opts })
    }

    fn get<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.opts
            .get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| format!("invalid value for --{key}: {v:?}"))
            })
            .transpose()
    }

    fn req<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        self.get(key)?.ok_or_else(|| format!("--{key} is required"))
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let result = match args.mode.as_str() {
        "arp" => arp(&args),
        "nd" => nd(&args),
        "icmp6-listen" => icmp6_listen(&args),
        "udp" => udp(&args),
        "udp-listen" => udp_listen(&args),
        m => Err(Failure::Usage(format!("unknown mode {m:?}"))),
    };
    match result {
        Ok(v) => {
            let mut out = json!({"ok": true});
            if let (Some(o), Value::Object(extra)) = (out.as_object_mut(), v) {
                o.extend(extra);
            }
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(e)) => usage(&e),
        Err(Failure::Io(what, e)) => {
            println!("{}", json!({"ok": false, "error": format!("{what}: {e}")}));
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Io(String, io::Error),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Usage(s)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
    let what = what.into();
    move |e| Failure::Io(what, e)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "forge: {msg}\nusage: forge arp|nd|icmp6-listen|udp|udp-listen [--opt value]… (see the source header)"
    );
    ExitCode::from(2)
}

/// A raw AF_PACKET socket bound to one interface and one ethertype.
struct Link {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

fn last_os_error<T>(what: &str) -> Result<T, Failure> {
    Err(Failure::Io(what.to_owned(), io::Error::last_os_error()))
}

impl Link {
    fn open(dev: &str, ethertype: u16) -> Result<Link, Failure> {
        let name = std::ffi::CString::new(dev).map_err(|e| Failure::Usage(e.to_string()))?;
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return last_os_error(&format!("interface {dev}"));
        }
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            )
        };
        if fd < 0 {
            return last_os_error("AF_PACKET socket");
        }
        // SAFETY: a fresh descriptor, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed C structs; the pointers and sizes passed match them.
        let mac = unsafe {
            let mut ifr: libc::ifreq = zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
                *d = *s as libc::c_char;
            }
            if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) != 0 {
                return last_os_error(&format!("hardware address of {dev}"));
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
        let ifindex = i32::try_from(ifindex).map_err(|e| Failure::Usage(e.to_string()))?;
        // SAFETY: as above.
        unsafe {
            let mut sll: libc::sockaddr_ll = zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex;
            if libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return last_os_error(&format!("binding to {dev}"));
            }
        }
        Ok(Link { fd, ifindex, mac })
    }

    fn send(&self, frame: &[u8]) -> Result<(), Failure> {
        // SAFETY: a valid buffer of the given length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return last_os_error(&format!("sending on ifindex {}", self.ifindex));
        }
        Ok(())
    }

    /// Frames received on the interface (not the ones it sent) until `deadline`, each passed
    /// to `f`.
    fn receive_until(&self, deadline: Instant, mut f: impl FnMut(&[u8])) -> Result<(), Failure> {
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Failure::Io("poll".into(), e));
            }
            if r == 0 {
                continue;
            }
            // SAFETY: zeroed C struct; sizes match.
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
                    continue;
                }
                return Err(Failure::Io("recvfrom".into(), e));
            }
            if pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            f(&buf[..n as usize]);
        }
    }
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn arp(a: &Args) -> Result<Value, Failure> {
    let dev: String = a.req("dev")?;
    let op: String = a.req("op")?;
    let sender: Ipv4Addr = a.req("sender-ip")?;
    let target: Ipv4Addr = a.req("target-ip")?;
    let count: u32 = a.get("count")?.unwrap_or(1);
    let opcode: u16 = match op.as_str() {
        "request" => 1,
        "reply" => 2,
        o => return Err(Failure::Usage(format!("--op {o:?}: request or reply"))),
    };
    let wait =
        Duration::from_millis(
            a.get("wait-ms")?
                .unwrap_or(if opcode == 1 { 1000 } else { 0 }),
        );
    let link = Link::open(&dev, ETH_P_ARP)?;
    let mut frame = ethernet(BROADCAST, link.mac, ETH_P_ARP);
    frame.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&opcode.to_be_bytes());
    frame.extend_from_slice(&link.mac);
    frame.extend_from_slice(&sender.octets());
    // A request asks for the target's hardware address; a (gratuitous) reply is broadcast.
    frame.extend_from_slice(if opcode == 1 { &[0; 6] } else { &BROADCAST });
    frame.extend_from_slice(&target.octets());
    for _ in 0..count {
        link.send(&frame)?;
    }
    let mut replies = 0u32;
    link.receive_until(Instant::now() + wait, |f| {
        // 14 bytes of Ethernet, then ARP: op at 6, sender protocol address at 14, target at 24.
        if f.len() >= 42
            && f[12..14] == ETH_P_ARP.to_be_bytes()
            && f[20..22] == 2u16.to_be_bytes()
            && f[28..32] == target.octets()
            && f[38..42] == sender.octets()
        {
            replies += 1;
        }
    })?;
    Ok(json!({"sent": count, "replies": replies, "mac": mac_text(&link.mac)}))
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The Ethernet address of IPv6 multicast group `g`.
fn multicast_mac(g: &Ipv6Addr) -> [u8; 6] {
    let o = g.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

fn solicited_node(t: &Ipv6Addr) -> Ipv6Addr {
    let o = t.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) from `src` to `dst`.
fn icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes();
    checksum(&[
        &src.octets(),
        &dst.octets(),
        &len,
        &[0, 0, 0, IPPROTO_ICMPV6],
        msg,
    ])
}

/// Where each kind of message carries the test's 16-bit marker (offsets in the ICMPv6
/// message): reserved bytes that receivers ignore.
fn marker_offset(icmp_type: u8) -> Option<usize> {
    match icmp_type {
        135 => Some(4),     // NS: 4 reserved bytes
        136 => Some(6),     // NA: flags, then 3 reserved bytes
        143 => Some(2 + 2), // MLDv2 report: reserved after the checksum
        131 => Some(6),     // MLDv1 report: reserved after the maximum response delay
        _ => None,
    }
}

fn nd(a: &Args) -> Result<Value, Failure> {
    let dev: String = a.req("dev")?;
    let kind: String = a.req("kind")?;
    let src: Ipv6Addr = a.req("src")?;
    let count: u32 = a.get("count")?.unwrap_or(1);
    let marker: u16 = a.get("marker")?.unwrap_or(0);
    let link = Link::open(&dev, ETH_P_IPV6)?;
    let (icmp_type, dst, target, hop_limit) = match kind.as_str() {
        "ns" => {
            let t: Ipv6Addr = a
                .get("target")?
                .unwrap_or(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));
            (135u8, solicited_node(&t), t, 255u8)
        }
        "na" => {
            let t: Ipv6Addr = a.get("target")?.unwrap_or(src);
            (136, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), t, 255)
        }
        "mld" => (
            143,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, marker),
            1,
        ),
        k => return Err(Failure::Usage(format!("--kind {k:?}: ns, na or mld"))),
    };
    let wait =
        Duration::from_millis(
            a.get("wait-ms")?
                .unwrap_or(if icmp_type == 135 { 1000 } else { 0 }),
        );
    let mut msg = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
    match icmp_type {
        135 => {
            msg.extend_from_slice(&target.octets());
            msg.extend_from_slice(&[1, 1]); // source link-layer address
            msg.extend_from_slice(&link.mac);
        }
        136 => {
            msg[4] = 0x20; // override
            msg.extend_from_slice(&target.octets());
            msg.extend_from_slice(&[2, 1]); // target link-layer address
            msg.extend_from_slice(&link.mac);
        }
        _ => {
            msg[7] = 1; // one record
            msg.extend_from_slice(&[4, 0, 0, 0]); // CHANGE_TO_EXCLUDE, no aux data, no sources
            msg.extend_from_slice(&target.octets());
        }
    }
    let at = marker_offset(icmp_type).expect("a marked type");
    msg[at..at + 2].copy_from_slice(&marker.to_be_bytes());
    let c = icmp6_checksum(&src, &dst, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut payload = Vec::new();
    let next = if icmp_type == 143 {
        // Hop-by-hop options: next header ICMPv6, length 0 (8 bytes), router alert (MLD),
        // two bytes of padding.
        payload.extend_from_slice(&[IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0]);
        IPPROTO_HOPOPTS
    } else {
        IPPROTO_ICMPV6
    };
    payload.extend_from_slice(&msg);
    let mut frame = ethernet(multicast_mac(&dst), link.mac, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[next, hop_limit]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&payload);
    for _ in 0..count {
        link.send(&frame)?;
    }
    let mut replies = 0u32;
    link.receive_until(Instant::now() + wait, |f| {
        // Ethernet (14), IPv6 (40, next header at 20), then a neighbour advertisement whose
        // target (at 8 in the message) is the solicited address.
        if icmp_type == 135
            && f.len() >= 14 + 40 + 24
            && f[12..14] == ETH_P_IPV6.to_be_bytes()
            && f[20] == IPPROTO_ICMPV6
            && f[54] == 136
            && f[62..78] == target.octets()
        {
            replies += 1;
        }
    })?;
    Ok(json!({"sent": count, "replies": replies, "type": icmp_type, "dst": dst.to_string()}))
}

fn icmp6_listen(a: &Args) -> Result<Value, Failure> {
    let dev: String = a.req("dev")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(60.0);
    let sock = Socket::new(
        Domain::IPV6,
        Type::RAW,
        Some(Protocol::from(i32::from(IPPROTO_ICMPV6))),
    )
    .map_err(io_err("raw ICMPv6 socket"))?;
    sock.bind_device(Some(dev.as_bytes()))
        .map_err(io_err(format!("binding to {dev}")))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io_err("SO_RCVTIMEO"))?;
    // MLDv2 reports go to ff02::16, which a host only receives as a member.
    let name = std::ffi::CString::new(dev.as_str()).map_err(|e| Failure::Usage(e.to_string()))?;
    // SAFETY: a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    sock.join_multicast_v6(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16), ifindex)
        .map_err(io_err(format!("joining ff02::16 on {dev}")))?;
    println!("{}", json!({"ok": true, "listening": dev}));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    let mut received = 0u64;
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first `n` bytes.
                let msg: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let Some(&t) = msg.first() else { continue };
                let marker = marker_offset(t)
                    .filter(|&at| msg.len() >= at + 2)
                    .map(|at| u16::from_be_bytes([msg[at], msg[at + 1]]));
                let src = from.as_socket().map(|s| s.ip().to_string());
                received += 1;
                println!("{}", json!({"type": t, "src": src, "marker": marker}));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(Failure::Io("recv".into(), e)),
        }
    }
    Ok(json!({"received": received}))
}

fn udp(a: &Args) -> Result<Value, Failure> {
    let from: SocketAddr = a.req("from")?;
    let to: SocketAddr = a.req("to")?;
    let payload: String = a.req("payload")?;
    let count: u32 = a.get("count")?.unwrap_or(1);
    if from.is_ipv4() != to.is_ipv4() {
        return Err(Failure::Usage(
            "--from and --to must be of the same family".into(),
        ));
    }
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // IPPROTO_RAW implies IP_HDRINCL for IPv4; IPv6 needs IPV6_HDRINCL set.
    let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        .map_err(io_err("raw socket"))?;
    if to.is_ipv6() {
        sock.set_header_included_v6(true)
            .map_err(io_err("IPV6_HDRINCL"))?;
    }
    let pkt = udp_packet(from, to, payload.as_bytes());
    let dst = SocketAddr::new(to.ip(), 0).into();
    for i in 0..count {
        sock.send_to(&pkt, &dst)
            .map_err(io_err(format!("datagram {i} from {from} to {to}")))?;
    }
    Ok(json!({"sent": count, "bytes": pkt.len()}))
}

/// An IPv4 (TTL 64, DF) or IPv6 (hop limit 64) packet holding one UDP datagram, checksums
/// filled in.
fn udp_packet(src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let ulen = u16::try_from(8 + data.len()).expect("a small payload");
    let mut udp = Vec::with_capacity(usize::from(ulen));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    let mut pkt = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + ulen).to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = IPPROTO_UDP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let pseudo = [0, IPPROTO_UDP, (ulen >> 8) as u8, ulen as u8];
            let c = udp_sum(checksum(&[&s.octets(), &d.octets(), &pseudo, &udp]));
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            ip.to_vec()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&ulen.to_be_bytes());
            ip[6] = IPPROTO_UDP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = [0u8; 8];
            pseudo[0..4].copy_from_slice(&u32::from(ulen).to_be_bytes());
            pseudo[7] = IPPROTO_UDP;
            let c = udp_sum(checksum(&[&s.octets(), &d.octets(), &pseudo, &udp]));
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            ip.to_vec()
        }
        _ => panic!("udp_packet: {src} and {dst} are of different families"),
    };
    pkt.extend_from_slice(&udp);
    pkt
}

/// A computed UDP checksum of 0 is sent as 0xffff (0 means "none", forbidden over IPv6).
fn udp_sum(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

fn udp_listen(a: &Args) -> Result<Value, Failure> {
    let port: u16 = a.req("port")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(60.0);
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))
        .map_err(io_err("UDP socket"))?;
    s.set_only_v6(false).map_err(io_err("IPV6_V6ONLY"))?;
    s.bind(&addr.into())
        .map_err(io_err(format!("binding {addr}")))?;
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io_err("SO_RCVTIMEO"))?;
    println!("{}", json!({"ok": true, "listening": addr.to_string()}));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buf = vec![0u8; 65536];
    let mut received = 0u64;
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                received += 1;
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                println!(
                    "{}",
                    json!({"from": from.to_string(), "payload": String::from_utf8_lossy(&buf[..n])})
                );
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(Failure::Io("recv".into(), e)),
        }
    }
    Ok(json!({"received": received}))
}

/// The Internet checksum (RFC 1071) of `parts` laid end to end; every part but the last must
/// be of even length.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut acc = 0u64;
    for w in parts.iter().flat_map(|p| p.chunks(2)) {
        acc += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        let h = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 192, 168, 0, 1, 192, 168, 0, 199,
        ];
        assert_eq!(checksum(&[&h]), 0xb861);
    }

    #[test]
    fn solicited_node_group() {
        let t: Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(
            solicited_node(&t),
            "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap()
        );
        let t: Ipv6Addr = "fd00:18:1::abcd:1234".parse().unwrap();
        assert_eq!(
            solicited_node(&t),
            "ff02::1:ffcd:1234".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            multicast_mac(&solicited_node(&t)),
            [0x33, 0x33, 0xff, 0xcd, 0x12, 0x34]
        );
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
