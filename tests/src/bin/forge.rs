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

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use testbed::cli::Args;
use testbed::packet::{
    BROADCAST, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_HOPOPTS, IPPROTO_ICMPV6,
    PacketSocket, RawIp, ethernet, ipv6_header, mac_text, segment_checksum, udp_packet,
};

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1), &[]) {
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
    let error = match result {
        Ok(v) => {
            let mut out = json!({"ok": true});
            if let (Some(o), Value::Object(extra)) = (out.as_object_mut(), v) {
                o.extend(extra);
            }
            println!("{out}");
            return ExitCode::SUCCESS;
        }
        Err(Failure::Usage(e)) => return usage(&e),
        Err(Failure::Io(what, e)) => format!("{what}: {e}"),
        Err(Failure::Os(e)) => e.to_string(),
    };
    println!("{}", json!({"ok": false, "error": error}));
    ExitCode::from(1)
}

enum Failure {
    Usage(String),
    Io(String, io::Error),
    /// An error that names what failed itself (those of `testbed::packet`).
    Os(io::Error),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Usage(s)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Os(e)
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

/// Writes `frame` `count` times on `link`, then counts for `wait` the frames `link` receives
/// (not the ones it sent) that are `replies`.
fn send_and_count(
    link: &PacketSocket,
    frame: &[u8],
    count: u32,
    wait: Duration,
    replies: impl Fn(&[u8]) -> bool,
) -> Result<u32, Failure> {
    for _ in 0..count {
        link.send(frame)?;
    }
    let deadline = Instant::now() + wait;
    let (mut buf, mut n) = (vec![0u8; 2048], 0u32);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(n);
        }
        if let Some(r) = link.recv(&mut buf, left)?
            && !r.outgoing
            && replies(&buf[..r.len])
        {
            n += 1;
        }
    }
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
    let link = PacketSocket::open(&dev, ETH_P_ARP)?;
    let mac = link.mac();
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&ETH_P_IP.to_be_bytes());
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&opcode.to_be_bytes());
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&sender.octets());
    // A request asks for the target's hardware address; a (gratuitous) reply is broadcast.
    arp.extend_from_slice(if opcode == 1 { &[0; 6] } else { &BROADCAST });
    arp.extend_from_slice(&target.octets());
    let frame = ethernet(&BROADCAST, &mac, ETH_P_ARP, &arp);
    let replies = send_and_count(&link, &frame, count, wait, |f| {
        // 14 bytes of Ethernet, then ARP: op at 6, sender protocol address at 14, target at 24.
        f.len() >= 42
            && f[12..14] == ETH_P_ARP.to_be_bytes()
            && f[20..22] == 2u16.to_be_bytes()
            && f[28..32] == target.octets()
            && f[38..42] == sender.octets()
    })?;
    Ok(json!({"sent": count, "replies": replies, "mac": mac_text(&mac)}))
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
    let link = PacketSocket::open(&dev, ETH_P_IPV6)?;
    let mac = link.mac();
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
            msg.extend_from_slice(&mac);
        }
        136 => {
            msg[4] = 0x20; // override
            msg.extend_from_slice(&target.octets());
            msg.extend_from_slice(&[2, 1]); // target link-layer address
            msg.extend_from_slice(&mac);
        }
        _ => {
            msg[7] = 1; // one record
            msg.extend_from_slice(&[4, 0, 0, 0]); // CHANGE_TO_EXCLUDE, no aux data, no sources
            msg.extend_from_slice(&target.octets());
        }
    }
    let at = marker_offset(icmp_type).expect("a marked type");
    msg[at..at + 2].copy_from_slice(&marker.to_be_bytes());
    let c = segment_checksum(src.into(), dst.into(), IPPROTO_ICMPV6, &msg, 2);
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
    let mut packet = ipv6_header(src, dst, next, payload.len() as u16, hop_limit).to_vec();
    packet.extend_from_slice(&payload);
    let frame = ethernet(&multicast_mac(&dst), &mac, ETH_P_IPV6, &packet);
    let replies = send_and_count(&link, &frame, count, wait, |f| {
        // Ethernet (14), IPv6 (40, next header at 20), then a neighbour advertisement whose
        // target (at 8 in the message) is the solicited address.
        icmp_type == 135
            && f.len() >= ETH_HLEN + 40 + 24
            && f[12..14] == ETH_P_IPV6.to_be_bytes()
            && f[20] == IPPROTO_ICMPV6
            && f[54] == 136
            && f[62..78] == target.octets()
    })?;
    Ok(json!({"sent": count, "replies": replies, "type": icmp_type, "dst": dst.to_string()}))
}

/// Prints `{"ok":true,"listening":…}`, then calls `receive` (each call a read of at most
/// 100 ms, which prints what it read) until `seconds` have passed; the reads that return true
/// count as received.
fn listen(
    listening: String,
    seconds: f64,
    mut receive: impl FnMut() -> io::Result<bool>,
) -> Result<Value, Failure> {
    println!("{}", json!({"ok": true, "listening": listening}));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut received = 0u64;
    while Instant::now() < deadline {
        match receive() {
            Ok(counted) => received += u64::from(counted),
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
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    listen(dev, seconds, || {
        let (n, from) = sock.recv_from(&mut buf)?;
        // SAFETY: recv_from initialised the first `n` bytes.
        let msg: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let Some(&t) = msg.first() else {
            return Ok(false);
        };
        let marker = marker_offset(t)
            .filter(|&at| msg.len() >= at + 2)
            .map(|at| u16::from_be_bytes([msg[at], msg[at + 1]]));
        let src = from.as_socket().map(|s| s.ip().to_string());
        println!("{}", json!({"type": t, "src": src, "marker": marker}));
        Ok(true)
    })
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
    let sock = RawIp::open(to.ip())?;
    let pkt = udp_packet(from, to, payload.as_bytes());
    for i in 0..count {
        sock.send(&pkt)
            .map_err(io_err(format!("datagram {i} from {from} to {to}")))?;
    }
    Ok(json!({"sent": count, "bytes": pkt.len()}))
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
    let mut buf = vec![0u8; 65536];
    listen(addr.to_string(), seconds, || {
        let (n, from) = sock.recv_from(&mut buf)?;
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        println!(
            "{}",
            json!({"from": from.to_string(), "payload": String::from_utf8_lossy(&buf[..n])})
        );
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
