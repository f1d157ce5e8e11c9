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
//! probe connect --to ADDR:PORT [--from ADDR] [--timeout-ms N]
//!     {"ok":true,"connect_ms":…} or {"ok":false,"kind":…,"error":…}.
//! probe send --to ADDR:PORT --bytes N [--seconds S] [--from ADDR] [--timeout-ms N] [--chunk B]
//!     Connect, send N bytes (paced evenly over S seconds if given), half-close, read the
//!     server's count and check it equals N. "kind" of a failure: refused, reset, timeout,
//!     unreachable, short-count (server saw fewer bytes), no-reply (closed before the count),
//!     io.
//! probe rr --to ADDR:PORT [--count N] [--size B] [--from ADDR] [--timeout-ms N]
//!     N request/response round trips of B bytes against an --echo server; latency stats.
//! probe cps --to ADDR:PORT [--seconds S] [--timeout-ms N]
//!     Short-lived connections back to back against a count-mode server; connections/s.
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
//! ```
//! `--timeout-ms` (default 10000) bounds each connect, read and write.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

struct Args {
    mode: String,
    opts: HashMap<String, String>,
    flags: Vec<String>,
}

const FLAGS: &[&str] = &["echo", "delete"];

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let mode = it.next().ok_or("missing mode")?;
        let (mut opts, mut flags) = (HashMap::new(), Vec::new());
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}"))?;
            if FLAGS.contains(&key) {
                flags.push(key.to_string());
            } else {
                let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                opts.insert(key.to_string(), v);
            }
        }
        Ok(Args { mode, opts, flags })
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

    fn timeout(&self) -> Result<Duration, String> {
        Ok(Duration::from_millis(
            self.get("timeout-ms")?.unwrap_or(10_000),
        ))
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
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
        "probe: {msg}\nusage: probe serve|connect|send|rr|cps|udp-serve|udp-send|flood|hold|map-fill [--opt value]… (see the source header)"
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
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
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
    let echo = a.flags.iter().any(|f| f == "echo");
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
    let t = Instant::now();
    Ok(match dial(to, from, a.timeout()?) {
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
    let timeout = a.timeout()?;
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
    let timeout = a.timeout()?;
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
    let timeout = a.timeout()?;
    let start = Instant::now();
    let mut done = 0u64;
    let mut reply = [0u8; 8];
    while start.elapsed().as_secs_f64() < seconds {
        let r = dial(to, None, timeout).and_then(|mut s| {
            s.write_all(&[1])?;
            s.shutdown(Shutdown::Write)?;
            s.read_exact(&mut reply)
        });
        if let Err(e) = r {
            return Ok(fail(
                kind(&e),
                format!("connection {done}: {e}"),
                json!({"done": done}),
            ));
        }
        done += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json_ok(
        json!({"connections": done, "seconds": elapsed, "per_sec": (done as f64 / elapsed).round()}),
    ))
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
    let timeout = a.timeout()?;
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
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // IPPROTO_RAW implies IP_HDRINCL for IPv4; IPv6 needs IPV6_HDRINCL set.
    let sock =
        Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).and_then(|s| {
            if to.is_ipv6() {
                s.set_header_included_v6(true)?;
            }
            Ok(s)
        });
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            return Ok(fail(
                kind(&e),
                format!("raw socket: {e}"),
                json!({"sent": 0}),
            ));
        }
    };
    // Raw sockets take the port of the destination sockaddr as 0.
    let dst = SocketAddr::new(to.ip(), 0).into();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
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
        match sock.send_to(&pkt, &dst) {
            Ok(_) => sent += 1,
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

/// Seconds with three decimals.
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// `first` + `n` (as a u32 for IPv4, a u128 for IPv6); `None` past the end of the space.
fn hold(a: &Args) -> Result<Outcome, Usage> {
    let to: SocketAddr = a.req("to")?;
    let count: u64 = a.req("count")?;
    let seconds: f64 = a.get("seconds")?.unwrap_or(10.0);
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(Usage("--seconds must be >= 0".into()));
    }
    let timeout = a.timeout()?;
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
    let delete = a.flags.iter().any(|f| f == "delete");
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

const TCP_SYN: u8 = 0x02;
const IPPROTO_TCP: u8 = 6;
/// The TCP header `syn_packet` writes: 20 bytes, no options.
const TCP_LEN: u16 = 20;

/// One bare SYN from `src` to `dst`: an IPv4 header (TTL 64, DF, identification `id`) or an
/// IPv6 header (hop limit 64), then a 20-byte TCP header (window 64240, sequence number
/// `seq`), both checksums filled in.
///
/// # Panics
/// If `src` and `dst` are of different families (`flood` checks they are not).
fn syn_packet(src: SocketAddr, dst: SocketAddr, seq: u32, id: u16) -> Vec<u8> {
    let mut tcp = [0u8; TCP_LEN as usize];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    // Acknowledgment number 0; data offset 5 words.
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pkt = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45; // version 4, 5 words
            ip[2..4].copy_from_slice(&(20 + TCP_LEN).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip[6] = 0x40; // DF, fragment offset 0
            ip[8] = 64;
            ip[9] = IPPROTO_TCP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let pseudo = [0, IPPROTO_TCP, (TCP_LEN >> 8) as u8, TCP_LEN as u8];
            let c = checksum(&[&s.octets(), &d.octets(), &pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            ip.to_vec()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60; // version 6, traffic class and flow label 0
            ip[4..6].copy_from_slice(&TCP_LEN.to_be_bytes());
            ip[6] = IPPROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = [0u8; 8]; // upper-layer length (32 bits), 3 zeros, next header
            pseudo[0..4].copy_from_slice(&u32::from(TCP_LEN).to_be_bytes());
            pseudo[7] = IPPROTO_TCP;
            let c = checksum(&[&s.octets(), &d.octets(), &pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            ip.to_vec()
        }
        _ => panic!("syn_packet: {src} and {dst} are of different families"),
    };
    pkt.extend_from_slice(&tcp);
    pkt
}

/// The one's-complement sum (RFC 1071) of `parts` laid end to end, as big-endian 16-bit
/// words; every part but the last must be of even length.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut acc = 0u64;
    for w in parts.iter().flat_map(|p| p.chunks(2)) {
        acc += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `parts` (see `ones_sum`).
fn checksum(parts: &[&[u8]]) -> u16 {
    !ones_sum(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
