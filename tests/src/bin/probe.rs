//! `probe`: a tiny traffic tool run inside testbed pods by tests and benchmarks.
//!
//! Every mode is bounded in time and reports with JSON lines on stdout; failures exit 1, usage
//! errors exit 2. Threads only, no async runtime: it must start fast and stay predictable.
//!
//! ```text
//! probe serve --port P [--bind ADDR] [--echo] [--seconds S] [--idle-ms N]
//!     TCP server, dual-stack on [::] unless --bind. Prints {"ok":true,"listening":…} once
//!     ready, then one line per finished connection ({"peer":…,"local":…,"bytes":…}).
//!     Count mode (default), one thread per connection: read and discard everything; when the
//!     client half-closes, reply with the byte count as 8 bytes big-endian, then close.
//!     --echo: write back everything read (for `probe rr`), close at EOF.
//!     Exits after --seconds (default 3600); idle connections are dropped after --idle-ms.
//! probe connect --to ADDR:PORT [--from ADDR] [--freebind] [--timeout-ms N]
//!     {"ok":true,"connect_ms":…} or {"ok":false,"kind":…,"error":…}. --freebind
//!     (IP_FREEBIND and IP_TRANSPARENT, or their IPv6 forms; needs CAP_NET_ADMIN) lets
//!     --from be an address this host does not own: a spoofed source from a real TCP stack.
//! probe send --to ADDR:PORT --bytes N [--seconds S] [--from ADDR] [--timeout-ms N] [--chunk B]
//!     Connect, send N bytes (paced evenly over S seconds if given), half-close, read the
//!     server's count and check it equals N. "kind" of a failure: refused, reset, timeout,
//!     unreachable, short-count (server saw fewer bytes), no-reply (closed before the count),
//!     io.
//! probe rr --to ADDR:PORT [--count N] [--size B] [--from ADDR] [--timeout-ms N]
//!     N request/response round trips of B bytes against an --echo server; latency stats.
//! probe cps --to ADDR:PORT [--seconds S] [--timeout-ms N] [--interval-ms N] [--keep-going]
//!     Short-lived connections back to back (a pause of --interval-ms between two) against a
//!     count-mode server; connections/s. The first failure ends it, unless --keep-going:
//!     then every failure is counted ("attempted", "failed", "first_error") and ok means
//!     none failed. "max_ms": the slowest connection (connect to answer).
//! probe udp-serve --port P [--seconds S]       echo every datagram back to its sender.
//! probe udp-send --to ADDR:PORT [--count N] [--size B] [--timeout-ms N]
//!     N datagrams one at a time, each waiting for its echo; ok when all came back.
//! probe flood --to ADDR:PORT --sources FIRST-IP --count N --packets P [--seconds S] [--ports K]
//!     Raw TCP SYNs with forged sources (needs CAP_NET_RAW), for flooding a datapath with
//!     connection attempts: packet i comes from source FIRST-IP + i % N (N consecutive
//!     addresses, same family as ADDR), port 10000 + (i / N) % 50000, to port
//!     PORT + (i / N / 50000) % K (K defaults to 1). Stops after P packets or
//!     S seconds (default 10); ENOBUFS/EAGAIN are retried after 100 µs. Nothing is received.
//!     {"ok":true,"sent":…,"sources":N,"seconds":…,"per_sec":…,"retries":…}.
//! probe hold --to ADDR:PORT --count N [--seconds S] [--timeout-ms N]
//!     Opens N TCP connections one after another and holds them, sending nothing, for S
//!     seconds (default 10); raises its own descriptor limit to fit. Then counts those the
//!     server closed. {"ok":true,"opened":…,"failed":…,"closed_by_peer":…,"still_open":…,
//!     "first_error":…}.
//! probe map-fill --pin PATH --count N [--base B] [--delete]
//!     Writes N junk entries into the pinned eBPF hash map at PATH (run on the host, as root):
//!     key i is the 32-bit little-endian number B + i (default 0x4000_0000) followed by zeros,
//!     every value zeros. Stops early when the kernel refuses (the map is full). --delete
//!     removes the same keys instead. {"ok":true,"done":…,"refused":…,"error":…}.
//! probe inject --iface IF --dst-mac MAC [--src-mac MAC] --from ADDR:PORT --to ADDR:PORT
//!       [--count N] [--option HEX] [--seq N] [--mac-key HEX [--mac-shift-secs S]]
//!     Writes N raw Ethernet frames (AF_PACKET, needs CAP_NET_RAW) on interface IF, each a
//!     TCP SYN from ADDR:PORT+i to --to with a random sequence number (or --seq), carrying the
//!     TCP options HEX (a multiple of 4 bytes, at most 40) if given: a SYN from the wire, for a
//!     namespace with no address or route (the fabric). With --mac-key (16 bytes), each SYN
//!     also ends with a connection MAC option computed with that key here, stamped with the
//!     wall clock moved by S seconds (default 0). {"ok":true,"sent":…}.
//! probe replay --iface IF --to ADDR:PORT [--variants LIST] [--delay-ms D] [--timeout-ms N]
//!     Sniffs IF (AF_PACKET, both directions) for the first TCP SYN to --to whose TCP header
//!     ends with a connection MAC option (kind 253, length 16, ExID 0x5043), then, after D ms
//!     (default 200), writes altered copies of it back on IF, one per variant of LIST
//!     (comma-separated, default `sport,seq`): `sport` another source port, `seq` another
//!     initial sequence number, `mac` one bit of the MAC flipped, `exact` unchanged; the
//!     option bytes are those captured, checksums are recomputed. Prints
//!     {"ok":true,"sniffing":IF} once the socket is bound, then
//!     {"ok":true,"captured":{…},"sent":…,"variants":[…]}; not ok if nothing was captured
//!     within --timeout-ms.
//! ```
//! `--timeout-ms` (default 10000) bounds each connect, read and write.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use testbed::cli::Args;
use testbed::packet::{
    ETH_HLEN, ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, PacketSocket, RawIp, TCP_ACK, TCP_SYN,
    fill_ipv4_checksum, ip_frame, mac_text, syn_packet, syn_with_options, tcp_checksum,
};

const FLAGS: &[&str] = &["echo", "delete", "freebind", "keep-going"];

/// `--timeout-ms`: 10 s unless given.
fn timeout(a: &Args) -> Result<Duration, String> {
    Ok(Duration::from_millis(
        a.get("timeout-ms")?.unwrap_or(10_000),
    ))
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1), FLAGS) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let result = match args.mode.as_str() {
        "serve" => serve(&args),
        "connect" => connect_mode(&args),
        "send" => send(&args),
        "rr" => rr(&args),
        "udp-serve" => udp_serve(&args),
        "cps" => cps(&args),
        "udp-send" => udp_send(&args),
        "flood" => flood(&args),
        "map-fill" => map_fill(&args),
        "hold" => hold(&args),
        "inject" => inject(&args),
        "replay" => replay(&args),
        m => return usage(&format!("unknown mode {m:?}")),
    };
    match result {
        Ok(Outcome(v)) => {
            let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
            println!("{v}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(Usage(e)) => usage(&e),
    }
}

struct Outcome(Value);
struct Usage(String);

impl From<String> for Usage {
    fn from(s: String) -> Self {
        Usage(s)
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "probe: {msg}\nusage: probe serve|connect|send|rr|cps|udp-serve|udp-send|flood|hold|map-fill|inject|replay [--opt value]… (see the source header)"
    );
    ExitCode::from(2)
}

fn fail(kind: &str, error: impl std::fmt::Display, extra: Value) -> Outcome {
    let mut v = json!({"ok": false, "kind": kind, "error": format!("{kind}: {error}")});
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    Outcome(v)
}

/// Names the failure classes tests care about.
fn kind(e: &io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
        ErrorKind::UnexpectedEof => "no-reply",
        _ => "io",
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Connects to `to`, from `from` (an address of this pod) if given, within `timeout`; the
/// returned stream has `timeout` as read and write timeout too.
fn dial(to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    dial_with(to, from, false, timeout)
}

/// [`dial`], with `freebind`: `from` may be an address this host does not own.
fn dial_with(
    to: SocketAddr,
    from: Option<IpAddr>,
    freebind: bool,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    if freebind {
        // FREEBIND lets the bind succeed; TRANSPARENT lets the route lookup take a source
        // address that is not local (without it connect() fails with ENETUNREACH).
        if to.is_ipv4() {
            s.set_freebind_v4(true)?;
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_freebind_v6(true)?;
            s.set_ip_transparent_v6(true)?;
        }
    }
    if let Some(ip) = from {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&to.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

fn serve(a: &Args) -> Result<Outcome, Usage> {
    let port: u16 = a.req("port")?;
    let bind: IpAddr = a.get("bind")?.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let seconds: u64 = a.get("seconds")?.unwrap_or(3600);
    let idle = Duration::from_millis(a.get("idle-ms")?.unwrap_or(120_000));
    let echo = a.flag("echo");
    let addr = SocketAddr::new(bind, port);
    let listener = match listen(addr) {
        Ok(l) => l,
        Err(e) => {
            return Ok(fail(
                kind(&e),
                format!("cannot listen on {addr}: {e}"),
                json!({}),
            ));
        }
    };
    exit_after(Duration::from_secs(seconds));
    println!(
        "{}",
        json!({"ok": true, "listening": addr.to_string(), "echo": echo})
    );
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("probe serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        std::thread::spawn(move || {
            let local = stream
                .local_addr()
                .map(canonical)
                .map(|l| l.to_string())
                .unwrap_or_default();
            let started = Instant::now();
            let (bytes, err) = handle(stream, echo, idle);
            let mut v = json!({"peer": canonical(peer).to_string(), "local": local, "bytes": bytes, "ms": ms(started.elapsed())});
            if let Some(e) = err {
                v["error"] = json!(format!("{}: {e}", kind(&e)));
            }
            println!("{v}");
        });
    }
}

/// `[::ffff:1.2.3.4]:p` (an IPv4 client of a dual-stack socket) shown as `1.2.3.4:p`.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Dual stack on [::]: IPv4 clients arrive as ::ffff:a.b.c.d.
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// One server connection: returns the bytes received and the error that ended it, if any.
fn handle(mut s: TcpStream, echo: bool, idle: Duration) -> (u64, Option<io::Error>) {
    let _ = s.set_read_timeout(Some(idle));
    let _ = s.set_write_timeout(Some(idle));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if echo && let Err(e) = s.write_all(&buf[..n]) {
                    return (total, Some(e));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (total, Some(e)),
        }
    }
    if !echo && let Err(e) = s.write_all(&total.to_be_bytes()) {
        return (total, Some(e));
    }
    let _ = s.shutdown(Shutdown::Write);
    (total, None)
}

fn exit_after(d: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(d);
        std::process::exit(0);
    });
}

fn connect_mode(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let from: Option<IpAddr> = a.get("from")?;
    let freebind = a.flag("freebind");
    let t = Instant::now();
    Ok(match dial_with(to, from, freebind, timeout(a)?) {
        Ok(s) => json_ok(
            json!({"to": to.to_string(), "local": s.local_addr().map(|l| l.to_string()).unwrap_or_default(), "connect_ms": ms(t.elapsed())}),
        ),
        Err(e) => fail(
            kind(&e),
            e,
            json!({"to": to.to_string(), "elapsed_ms": ms(t.elapsed())}),
        ),
    })
}

fn json_ok(extra: Value) -> Outcome {
    let mut v = json!({"ok": true});
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    Outcome(v)
}

fn send(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let bytes: u64 = a.req("bytes")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(0.0);
    let chunk: usize =
        a.get("chunk")?
            .unwrap_or(if seconds > 0.0 { 16 * 1024 } else { 256 * 1024 });
    let from: Option<IpAddr> = a.get("from")?;
    let timeout = timeout(a)?;
    if chunk == 0 || !seconds.is_finite() || seconds < 0.0 {
        return Err(Usage("--chunk must be > 0 and --seconds >= 0".into()));
    }
    let start = Instant::now();
    let mut s = match dial(to, from, timeout) {
        Ok(s) => s,
        Err(e) => {
            return Ok(fail(
                kind(&e),
                format!("connect to {to}: {e}"),
                json!({"bytes_sent": 0}),
            ));
        }
    };
    let connect_ms = ms(start.elapsed());
    let buf = vec![0x5au8; chunk];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk as u64) as usize;
        if let Err(e) = s.write_all(&buf[..n]) {
            return Ok(fail(
                kind(&e),
                format!("after {sent} of {bytes} bytes: {e}"),
                json!({"bytes_sent": sent, "elapsed_ms": ms(start.elapsed())}),
            ));
        }
        sent += n as u64;
        if seconds > 0.0 {
            // Pace: byte k is due at k/bytes of the way through `seconds`.
            let due = Duration::from_secs_f64(seconds * sent as f64 / bytes as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if let Err(e) = s.shutdown(Shutdown::Write) {
        return Ok(fail(
            kind(&e),
            format!("half-close: {e}"),
            json!({"bytes_sent": sent}),
        ));
    }
    let mut reply = [0u8; 8];
    if let Err(e) = s.read_exact(&mut reply) {
        let msg = if e.kind() == ErrorKind::UnexpectedEof {
            "connection closed before the byte count".to_string()
        } else {
            e.to_string()
        };
        return Ok(fail(
            kind(&e),
            format!("reading the count after sending {sent} bytes: {msg}"),
            json!({"bytes_sent": sent, "elapsed_ms": ms(start.elapsed())}),
        ));
    }
    let counted = u64::from_be_bytes(reply);
    let elapsed = start.elapsed();
    let stats = json!({"bytes": bytes, "bytes_sent": sent, "server_bytes": counted, "connect_ms": connect_ms, "elapsed_ms": ms(elapsed), "mbit_per_s": (bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6 * 100.0).round() / 100.0});
    Ok(if counted == bytes {
        json_ok(stats)
    } else {
        fail(
            "short-count",
            format!("server received {counted} of {bytes} bytes"),
            stats,
        )
    })
}

fn rr(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let count: usize = a.get("count")?.unwrap_or(1000);
    let size: usize = a.get("size")?.unwrap_or(64);
    let timeout = timeout(a)?;
    let mut s = match dial(to, a.get("from")?, timeout) {
        Ok(s) => s,
        Err(e) => return Ok(fail(kind(&e), format!("connect to {to}: {e}"), json!({}))),
    };
    let (req, mut resp) = (vec![0x42u8; size.max(1)], vec![0u8; size.max(1)]);
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        if let Err(e) = s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
            return Ok(fail(
                kind(&e),
                format!("round trip {i}: {e}"),
                json!({"done": i}),
            ));
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    // Microseconds with two decimals: the differences measured are of a few microseconds.
    let us = |x: f64| (x * 100.0).round() / 100.0;
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p).round() as usize)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(0.0)
    };
    let mean = rtts.iter().map(Duration::as_secs_f64).sum::<f64>() / rtts.len().max(1) as f64 * 1e6;
    Ok(json_ok(
        json!({"count": count, "size": size, "mean_us": us(mean), "p50_us": us(pct(0.5)),
               "p99_us": us(pct(0.99)), "p999_us": us(pct(0.999)), "max_us": us(pct(1.0))}),
    ))
}

/// Short-lived connections, one after another for `--seconds`: connect, send one byte,
/// half-close, read the count-mode server's 8-byte answer, close. Connections per second.
fn cps(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(2.0);
    let interval = Duration::from_millis(a.get("interval-ms")?.unwrap_or(0));
    let keep_going = a.flag("keep-going");
    let timeout = timeout(a)?;
    let start = Instant::now();
    let (mut done, mut failed, mut first_error) = (0u64, 0u64, None::<String>);
    let mut slowest = Duration::ZERO;
    let mut reply = [0u8; 8];
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let r = dial(to, None, timeout).and_then(|mut s| {
            s.write_all(&[1])?;
            s.shutdown(Shutdown::Write)?;
            s.read_exact(&mut reply)
        });
        slowest = slowest.max(t.elapsed());
        match r {
            Ok(()) => done += 1,
            Err(e) if !keep_going => {
                return Ok(fail(
                    kind(&e),
                    format!("connection {done}: {e}"),
                    json!({"done": done}),
                ));
            }
            Err(e) => {
                first_error.get_or_insert_with(|| {
                    format!("connection {}: {}: {e}", done + failed, kind(&e))
                });
                failed += 1;
            }
        }
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = json!({"connections": done, "attempted": done + failed, "failed": failed,
                       "first_error": first_error, "max_ms": ms(slowest), "seconds": elapsed,
                       "per_sec": (done as f64 / elapsed).round()});
    Ok(if failed == 0 {
        json_ok(stats)
    } else {
        fail(
            "failed",
            format!("{failed} of {} connections failed", done + failed),
            stats,
        )
    })
}

fn udp_serve(a: &Args) -> Result<Outcome, Usage> {
    let port: u16 = a.req("port")?;
    let seconds: u64 = a.get("seconds")?.unwrap_or(3600);
    let addr = SocketAddr::new(
        a.get("bind")?.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        port,
    );
    let sock = match udp_bind(addr) {
        Ok(s) => s,
        Err(e) => {
            return Ok(fail(
                kind(&e),
                format!("cannot bind {addr}: {e}"),
                json!({}),
            ));
        }
    };
    exit_after(Duration::from_secs(seconds));
    println!(
        "{}",
        json!({"ok": true, "listening": addr.to_string(), "udp": true})
    );
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let _ = sock.send_to(&buf[..n], peer);
            }
            Err(e) => {
                eprintln!("probe udp-serve: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn udp_bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn udp_send(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let count: u32 = a.get("count")?.unwrap_or(10);
    let size: usize = a.get::<usize>("size")?.unwrap_or(64).clamp(4, 65000);
    let timeout = timeout(a)?;
    let local = SocketAddr::new(
        if to.is_ipv6() {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4([0, 0, 0, 0].into())
        },
        0,
    );
    let sock = match UdpSocket::bind(local).and_then(|s| s.connect(to).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return Ok(fail(kind(&e), e, json!({}))),
    };
    if let Err(e) = sock.set_read_timeout(Some(timeout)) {
        return Ok(fail(kind(&e), e, json!({})));
    }
    let (mut received, mut buf) = (0u32, vec![0u8; 65536]);
    // The last receive error: `refused` means an ICMP port unreachable came back.
    let mut recv_error: Option<&'static str> = None;
    let start = Instant::now();
    for seq in 0..count {
        let mut msg = vec![0u8; size];
        msg[..4].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = sock.send(&msg) {
            return Ok(fail(
                kind(&e),
                e,
                json!({"sent": seq, "received": received}),
            ));
        }
        // Skip stale echoes of earlier (timed-out) datagrams; bounded by the read timeout.
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 4 && buf[..4] == seq.to_be_bytes() => {
                    received += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    recv_error = Some(kind(&e));
                    break;
                }
            }
        }
    }
    let stats = json!({"sent": count, "received": received, "elapsed_ms": ms(start.elapsed()),
                       "recv_error": recv_error});
    Ok(if received == count {
        json_ok(stats)
    } else {
        fail(
            "timeout",
            format!("{} of {count} datagrams got no echo", count - received),
            stats,
        )
    })
}

/// Raw SYNs from `--count` consecutive forged sources; see the header. Never waits for an
/// answer: what happens to the SYNs is for the caller to observe on the node.
fn flood(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let first: IpAddr = a.req("sources")?;
    let count: u64 = a.req("count")?;
    let packets: u64 = a.req("packets")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(10.0);
    let ports: u64 = a.get("ports")?.unwrap_or(1);
    if count == 0 || ports == 0 || !seconds.is_finite() || seconds < 0.0 {
        return Err(Usage(
            "--count and --ports must be > 0 and --seconds >= 0".into(),
        ));
    }
    if u64::from(to.port()) + ports - 1 > u64::from(u16::MAX) {
        return Err(Usage(format!(
            "--ports {ports} from port {} runs past 65535",
            to.port()
        )));
    }
    if first.is_ipv4() != to.is_ipv4() {
        return Err(Usage(
            "--sources and --to must be of the same family".into(),
        ));
    }
    if nth_source(first, count - 1).is_none() {
        return Err(Usage(format!(
            "--count {count} from {first} runs past the last address"
        )));
    }
    let sock = match RawIp::open(to.ip()) {
        Ok(s) => s,
        // The error names the step (`raw socket`, `IPV6_HDRINCL`).
        Err(e) => return Ok(fail(kind(&e), &e, json!({"sent": 0}))),
    };
    let seed = seed();
    let limit = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let (mut sent, mut retries) = (0u64, 0u64);
    while sent < packets && start.elapsed() < limit {
        let src = nth_source(first, sent % count).expect("range checked above");
        let sport = 10_000 + ((sent / count) % 50_000) as u16;
        let dport = to.port() + ((sent / count / 50_000) % ports) as u16;
        let r = mix(seed.wrapping_add(sent));
        let pkt = syn_packet(
            SocketAddr::new(src, sport),
            SocketAddr::new(to.ip(), dport),
            r as u32,
            (r >> 32) as u16,
        );
        match sock.send(&pkt) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) => {
                retries += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Ok(fail(
                    kind(&e),
                    format!("packet {sent} from {src}:{sport} to {to}: {e}"),
                    json!({"sent": sent, "sources": count, "retries": retries,
                           "seconds": secs(start.elapsed())}),
                ));
            }
        }
    }
    let elapsed = start.elapsed();
    Ok(json_ok(
        json!({"sent": sent, "sources": count, "seconds": secs(elapsed),
               "per_sec": (sent as f64 / elapsed.as_secs_f64().max(1e-9)).round(),
               "retries": retries}),
    ))
}

/// An AF_PACKET socket on `iface` that sees every frame, both directions; or the failure to
/// report.
fn packet_socket(iface: &str) -> Result<PacketSocket, Outcome> {
    PacketSocket::open(iface, ETH_P_ALL).map_err(|e| {
        fail(
            kind(&e),
            format!("packet socket on {iface}: {e}"),
            json!({}),
        )
    })
}

/// A seed for [`mix`] that differs from run to run.
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id())
}

fn parse_mac(text: &str) -> Result<[u8; 6], Usage> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(Usage(format!("invalid MAC address {text:?}")));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| Usage(format!("invalid MAC address {text:?}")))?;
    }
    Ok(mac)
}

fn parse_hex(text: &str) -> Result<Vec<u8>, Usage> {
    let bad = || Usage(format!("invalid hex {text:?}"));
    if !text.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Raw SYNs written as Ethernet frames on an interface; see the header.
fn inject(a: &Args) -> Result<Outcome, Usage> {
    let iface: String = a.req("iface")?;
    let dst_mac = parse_mac(&a.req::<String>("dst-mac")?)?;
    let src_mac = match a.get::<String>("src-mac")? {
        Some(m) => parse_mac(&m)?,
        None => [0x02, 0, 0, 0, 0, 0x01],
    };
    let from: SocketAddr = a.req("from")?;
    let to: SocketAddr = a.req("to")?;
    let count: u16 = a.get("count")?.unwrap_or(1);
    let options = match a.get::<String>("option")? {
        Some(h) => parse_hex(&h)?,
        None => Vec::new(),
    };
    let key: Option<[u8; portcullis_common::mac::KEY_LEN]> = match a.get::<String>("mac-key")? {
        Some(h) => Some(
            parse_hex(&h)?
                .try_into()
                .map_err(|_| Usage("--mac-key must be 16 bytes".into()))?,
        ),
        None => None,
    };
    let shift: i64 = a.get("mac-shift-secs")?.unwrap_or(0);
    let fixed_seq: Option<u32> = a.get("seq")?;
    let room = 40
        - if key.is_some() {
            portcullis_common::mac::OPTION_LEN
        } else {
            0
        };
    if !options.len().is_multiple_of(4) || options.len() > room {
        return Err(Usage(format!(
            "--option must be a multiple of 4 bytes, at most {room}"
        )));
    }
    if from.is_ipv4() != to.is_ipv4() {
        return Err(Usage("--from and --to must be of the same family".into()));
    }
    if u32::from(from.port()) + u32::from(count) > 65536 {
        return Err(Usage("--count from --from's port runs past 65535".into()));
    }
    let sock = match packet_socket(&iface) {
        Ok(s) => s,
        Err(failed) => return Ok(failed),
    };
    let seed = seed();
    let mut ports = Vec::new();
    for i in 0..count {
        let sport = from.port() + i;
        let r = mix(seed.wrapping_add(u64::from(i)));
        let seq = fixed_seq.unwrap_or(r as u32);
        let src = SocketAddr::new(from.ip(), sport);
        let mut opts = options.clone();
        if let Some(key) = &key {
            opts.extend_from_slice(&signed_option(key, src, to, seq, shift));
        }
        let pkt = syn_with_options(src, to, seq, (r >> 32) as u16, &opts);
        if let Err(e) = sock.send(&ip_frame(&dst_mac, &src_mac, &pkt)) {
            return Ok(fail(
                kind(&e),
                format!("frame {i} on {iface}: {e}"),
                json!({"sent": i}),
            ));
        }
        ports.push(sport);
    }
    Ok(json_ok(
        json!({"sent": count, "iface": iface, "source_ports": ports}),
    ))
}

/// The connection MAC option the source node would add to a SYN, computed here with `key`,
/// stamped with the wall clock moved by `shift` seconds.
fn signed_option(
    key: &[u8; portcullis_common::mac::KEY_LEN],
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    shift: i64,
) -> [u8; portcullis_common::mac::OPTION_LEN] {
    use portcullis_common::mac;
    let map_form = |ip: IpAddr| match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let at = now.saturating_add_signed(shift.saturating_mul(1_000_000_000));
    mac::option(
        key,
        &mac::Syn {
            family: if src.is_ipv4() { 4 } else { 6 },
            src: map_form(src.ip()),
            dst: map_form(dst.ip()),
            sport: src.port(),
            dport: dst.port(),
            seq,
            time: mac::time_units(at),
        },
    )
}

/// A SYN taken off the wire: its frame cut into Ethernet header, IP header and TCP segment.
struct Captured {
    eth: [u8; ETH_HLEN],
    ip: Vec<u8>,
    tcp: Vec<u8>,
    /// TCP header length.
    doff: usize,
}

impl Captured {
    /// A TCP SYN (no ACK) to `to` whose header ends with our option (RFC 6994, kind 253,
    /// length 16, ExID 0x5043).
    fn parse(frame: &[u8], to: SocketAddr) -> Option<Captured> {
        let eth: [u8; ETH_HLEN] = frame.get(..ETH_HLEN)?.try_into().ok()?;
        let ip = frame.get(ETH_HLEN..)?;
        let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
        let (hlen, total) = match (ethertype, to.ip()) {
            (ETH_P_IP, IpAddr::V4(want)) => {
                if ip.len() < 20
                    || ip[0] >> 4 != 4
                    || ip[9] != IPPROTO_TCP
                    || ip[16..20] != want.octets()
                {
                    return None;
                }
                (
                    usize::from(ip[0] & 0xf) * 4,
                    usize::from(u16::from_be_bytes([ip[2], ip[3]])),
                )
            }
            (ETH_P_IPV6, IpAddr::V6(want)) => {
                if ip.len() < 40
                    || ip[0] >> 4 != 6
                    || ip[6] != IPPROTO_TCP
                    || ip[24..40] != want.octets()
                {
                    return None;
                }
                (40, 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])))
            }
            _ => return None,
        };
        let tcp = ip.get(hlen..total)?;
        if tcp.len() < 20 || u16::from_be_bytes([tcp[2], tcp[3]]) != to.port() {
            return None;
        }
        if tcp[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return None;
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        if doff < 20 + portcullis_common::mac::OPTION_LEN || doff > tcp.len() {
            return None;
        }
        let opt: &[u8; portcullis_common::mac::OPTION_LEN] = tcp
            [doff - portcullis_common::mac::OPTION_LEN..doff]
            .try_into()
            .ok()?;
        portcullis_common::mac::parse(opt)?;
        Some(Captured {
            eth,
            ip: ip[..hlen].to_vec(),
            tcp: tcp.to_vec(),
            doff,
        })
    }

    fn option(&self) -> &[u8] {
        &self.tcp[self.doff - portcullis_common::mac::OPTION_LEN..self.doff]
    }

    fn sport(&self) -> u16 {
        u16::from_be_bytes([self.tcp[0], self.tcp[1]])
    }

    fn seq(&self) -> u32 {
        u32::from_be_bytes([self.tcp[4], self.tcp[5], self.tcp[6], self.tcp[7]])
    }

    /// The frame of an altered copy, checksums recomputed; `None` for an unknown variant.
    fn variant(&self, name: &str) -> Option<Vec<u8>> {
        let (mut ip, mut tcp) = (self.ip.clone(), self.tcp.clone());
        match name {
            "sport" => {
                let other = if self.sport() == u16::MAX {
                    1024
                } else {
                    self.sport() + 1
                };
                tcp[0..2].copy_from_slice(&other.to_be_bytes());
            }
            "seq" => tcp[4..8].copy_from_slice(&self.seq().wrapping_add(1).to_be_bytes()),
            "mac" => tcp[self.doff - 1] ^= 1,
            "exact" => {}
            _ => return None,
        }
        if ip[0] >> 4 == 4 {
            fill_ipv4_checksum(&mut ip);
        }
        let c = tcp_checksum(&ip, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut f = self.eth.to_vec();
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        Some(f)
    }
}

/// Captures a signed SYN and writes altered copies of it; see the header.
fn replay(a: &Args) -> Result<Outcome, Usage> {
    let iface: String = a.req("iface")?;
    let to: SocketAddr = a.req("to")?;
    let variants: String = a.get("variants")?.unwrap_or_else(|| "sport,seq".into());
    let variants: Vec<&str> = variants.split(',').filter(|v| !v.is_empty()).collect();
    let delay = Duration::from_millis(a.get("delay-ms")?.unwrap_or(200));
    let timeout = timeout(a)?;
    if let Some(v) = variants
        .iter()
        .find(|v| !["sport", "seq", "mac", "exact"].contains(v))
    {
        return Err(Usage(format!("unknown variant {v:?}")));
    }
    let sock = match packet_socket(&iface) {
        Ok(s) => s,
        Err(failed) => return Ok(failed),
    };
    println!("{}", json!({"ok": true, "sniffing": iface}));
    let _ = io::stdout().flush();
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    let (mut frames, mut captured) = (0u64, None);
    while captured.is_none() && start.elapsed() < timeout {
        match sock.recv(&mut buf, Duration::from_millis(100)) {
            Ok(Some(r)) => {
                frames += 1;
                captured = Captured::parse(&buf[..r.len], to);
            }
            Ok(None) => {}
            Err(e) => {
                return Ok(fail(
                    kind(&e),
                    format!("reading {iface}: {e}"),
                    json!({"frames": frames}),
                ));
            }
        }
    }
    let Some(c) = captured else {
        return Ok(fail(
            "timeout",
            format!("no SYN to {to} with a connection MAC on {iface} within {timeout:?}"),
            json!({"frames": frames}),
        ));
    };
    let opt: [u8; portcullis_common::mac::OPTION_LEN] =
        c.option().try_into().expect("option length");
    let (time, mac) = portcullis_common::mac::parse(&opt).expect("checked at capture");
    let desc = json!({
        "sport": c.sport(), "seq": c.seq(), "option": hex(c.option()), "time": time,
        "mac": format!("{mac:016x}"), "tcp_header_len": c.doff,
        "dst_mac": mac_text(&c.eth[..6]), "src_mac": mac_text(&c.eth[6..12]),
    });
    std::thread::sleep(delay);
    let mut sent = 0u64;
    for v in &variants {
        let frame = c.variant(v).expect("variants checked above");
        if let Err(e) = sock.send(&frame) {
            return Ok(fail(
                kind(&e),
                format!("writing variant {v} on {iface}: {e}"),
                json!({"captured": desc, "sent": sent}),
            ));
        }
        sent += 1;
    }
    Ok(json_ok(
        json!({"captured": desc, "sent": sent, "variants": variants, "frames": frames}),
    ))
}

/// Seconds with three decimals.
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

fn hold(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let count: u64 = a.req("count")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(10.0);
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(Usage("--seconds must be >= 0".into()));
    }
    let timeout = timeout(a)?;
    let want = count + 64;
    let limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: a plain struct passed by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        let e = io::Error::last_os_error();
        return Ok(fail(
            kind(&e),
            format!("raising RLIMIT_NOFILE to {want}: {e}"),
            json!({}),
        ));
    }
    let (mut held, mut failed, mut first_error) = (Vec::new(), 0u64, None);
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let mut closed = 0u64;
    let mut buf = [0u8; 1];
    for s in &held {
        let _ = s.set_nonblocking(true);
        match s.peek(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // EOF, a reset, or bytes (a TLS alert) before the close: the server let go.
            _ => closed += 1,
        }
    }
    Ok(json_ok(json!({
        "opened": held.len(), "failed": failed, "closed_by_peer": closed,
        "still_open": held.len() as u64 - closed, "first_error": first_error,
    })))
}

/// One `bpf(2)` call on a zeroed attribute block.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, large enough `union bpf_attr` for every command used here;
    // the pointers it carries point at live buffers of the sizes the kernel was told.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn map_fill(a: &Args) -> Result<Outcome, Usage> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_NOEXIST: u64 = 1;
    let pin: String = a.req("pin")?;
    let count: u32 = a.req("count")?;
    let base: u32 = a.get("base")?.unwrap_or(0x4000_0000);
    let delete = a.flag("delete");
    let path = std::ffi::CString::new(pin.clone()).map_err(|e| Usage(e.to_string()))?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    let fd = match bpf(BPF_OBJ_GET, &mut attr) {
        Ok(fd) => fd as u64,
        Err(e) => return Ok(fail(kind(&e), format!("opening {pin}: {e}"), json!({}))),
    };
    // struct bpf_map_info begins: type, id, key_size, value_size, max_entries (u32 each).
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = fd | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    if let Err(e) = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) {
        return Ok(fail(kind(&e), format!("map info of {pin}: {e}"), json!({})));
    }
    let (key_size, value_size) = (info[2] as usize, info[3] as usize);
    if key_size < 4 {
        return Err(Usage(format!(
            "{pin} has {key_size}-byte keys; need 4 or more"
        )));
    }
    let mut key = vec![0u8; key_size];
    let value = vec![0u8; value_size];
    let (mut done, mut refused, mut error) = (0u32, 0u32, None);
    for i in 0..count {
        key[..4].copy_from_slice(&base.wrapping_add(i).to_le_bytes());
        let mut attr = [0u64; 16];
        attr[0] = fd;
        attr[1] = key.as_ptr() as u64;
        if !delete {
            attr[2] = value.as_ptr() as u64;
            attr[3] = BPF_NOEXIST;
        }
        let r = if delete {
            bpf(BPF_MAP_DELETE_ELEM, &mut attr)
        } else {
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
        };
        match r {
            Ok(_) => done += 1,
            Err(e) => {
                refused += 1;
                error = Some(e.to_string());
                if !delete {
                    break;
                }
            }
        }
    }
    // SAFETY: `fd` came from BPF_OBJ_GET and is closed once.
    unsafe { libc::close(fd as i32) };
    Ok(json_ok(json!({
        "done": done, "refused": refused, "error": error,
        "max_entries": info[4], "key_size": key_size, "value_size": value_size,
    })))
}

/// `first` + `n` (as a u32 for IPv4, a u128 for IPv6); `None` past the end of the space.
fn nth_source(first: IpAddr, n: u64) -> Option<IpAddr> {
    match first {
        IpAddr::V4(a) => u32::from(a)
            .checked_add(u32::try_from(n).ok()?)
            .map(|x| IpAddr::V4(x.into())),
        IpAddr::V6(a) => u128::from(a)
            .checked_add(n.into())
            .map(|x| IpAddr::V6(x.into())),
    }
}

/// splitmix64: sequence numbers and IP ids that vary without a random-number crate.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use testbed::packet::ones_sum;

    #[test]
    fn syn_with_options_and_a_captured_copy() {
        use portcullis_common::mac;
        let (s, d): (Ipv6Addr, Ipv6Addr) = (
            "fd00:18:1::2".parse().unwrap(),
            "fd00:18:2::2".parse().unwrap(),
        );
        let syn = mac::Syn {
            family: 6,
            src: s.octets(),
            dst: d.octets(),
            sport: 40000,
            dport: 8080,
            seq: 99,
            time: 5,
        };
        let opt = mac::option(&[3; 16], &syn);
        let mut opts = vec![2, 4, 5, 0xb4]; // MSS 1460
        opts.extend_from_slice(&opt);
        let to = SocketAddr::new(d.into(), 8080);
        let p = syn_with_options(SocketAddr::new(s.into(), 40000), to, 99, 0, &opts);
        assert_eq!(p.len(), 40 + 20 + 20);
        let (ip, tcp) = p.split_at(40);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 40);
        assert_eq!(tcp[12] >> 4, 10, "data offset in words");
        let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 0, 0, 40, 0, 0, 0, 6]].concat();
        assert_eq!(ones_sum(&[&pseudo, tcp]), 0xffff, "TCP checksum");
        let frame = ip_frame(&[2, 0, 0, 0, 0, 2], &[2, 0, 0, 0, 0, 1], &p);
        let c = Captured::parse(&frame, to).expect("a SYN with our option");
        assert_eq!((c.sport(), c.seq(), c.option()), (40000, 99, &opt[..]));
        assert!(Captured::parse(&frame, SocketAddr::new(d.into(), 8081)).is_none());
        for (name, sport, seq) in [
            ("sport", 40001, 99),
            ("seq", 40000, 100),
            ("exact", 40000, 99),
        ] {
            let f = c.variant(name).expect("known variant");
            let v = Captured::parse(&f, to).expect("still a SYN with our option");
            assert_eq!(
                (v.sport(), v.seq(), v.option()),
                (sport, seq, &opt[..]),
                "{name}"
            );
            assert_eq!(
                ones_sum(&[
                    &[&s.octets()[..], &d.octets()[..], &[0, 0, 0, 40, 0, 0, 0, 6]].concat(),
                    &f[54..]
                ]),
                0xffff,
                "{name}"
            );
        }
        let f = c.variant("mac").expect("known variant");
        assert_ne!(&f[54 + 24..54 + 40], &opt[..]);
        assert!(c.variant("nonsense").is_none());
        // Without our option, or a SYN-ACK: not captured.
        let bare = ip_frame(
            &[2; 6],
            &[2; 6],
            &syn_packet(SocketAddr::new(s.into(), 1), to, 1, 0),
        );
        assert!(Captured::parse(&bare, to).is_none());
        let mut synack = frame.clone();
        synack[54 + 13] |= TCP_ACK;
        assert!(Captured::parse(&synack, to).is_none());
    }

    #[test]
    fn ipv4_variant_checksums() {
        let (s, d) = (Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 2, 2));
        let to = SocketAddr::new(d.into(), 8080);
        let opt = [253, 16, 0x50, 0x43, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        let p = syn_with_options(SocketAddr::new(s.into(), 5000), to, 7, 9, &opt);
        let c = Captured::parse(&ip_frame(&[2; 6], &[2; 6], &p), to).expect("captured");
        let f = c.variant("sport").expect("variant");
        let (ip, tcp) = f[14..].split_at(20);
        assert_eq!(ones_sum(&[ip]), 0xffff, "IPv4 header checksum");
        let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 6, 0, 36]].concat();
        assert_eq!(ones_sum(&[&pseudo, tcp]), 0xffff, "TCP checksum");
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 5001);
        assert_eq!(&tcp[20..], &opt);
        assert_eq!(
            parse_mac("02:aB:00:00:00:ff").ok(),
            Some([2, 0xab, 0, 0, 0, 0xff])
        );
        assert!(parse_mac("02:ab").is_err());
        assert_eq!(parse_hex("00ff10").ok(), Some(vec![0, 0xff, 0x10]));
        assert!(parse_hex("0").is_err());
    }

    #[test]
    fn sources() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(nth_source(v4("10.0.0.255"), 1), Some(v4("10.0.1.0")));
        assert_eq!(nth_source(v4("255.255.255.254"), 2), None);
        assert_eq!(nth_source(v4("fd00::ffff"), 2), Some(v4("fd00::1:1")));
        assert_eq!(
            nth_source(v4("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 1),
            None
        );
    }
}
