//! `cargo xtask bench`: measurements on the testbed, each against baselines measured in the
//! same run, so that a shared, noisy machine hits every setting alike (runs alternate between
//! settings within each repetition).
//!
//! Settings for the data-path scenarios:
//! - `none`: the same testbed with no enforcement;
//! - `portcullis`: agents enforcing, the pair authenticated by the agents' mTLS handshake;
//! - `stunnel`: stunnel client/server pairs with mutual TLS between the same pods (the
//!   user-space proxy model: every byte through a proxy);
//! - `nftables`: a conventional kernel filter on the server's node admitting the pair by
//!   address (conntrack, established/related).
//!
//! Output: a table on stdout with progress on stderr, and `bench.json` / `bench.md`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario, eventually, ok, sock},
};

use crate::cargo;

mod kube;

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions per setting.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Seconds per throughput and connection-rate run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// A reduced set for smoke tests (well under five minutes): one repetition, short runs,
    /// 1,000 endpoints, the debug agent.
    #[arg(long)]
    quick: bool,
    /// Where the JSON and Markdown results go (default: <target>/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the control-plane measurement, with this many endpoints (for profiling).
    #[arg(long, value_name = "N")]
    scale_only: Option<usize>,
    /// Only the auth-entry measurement (100 × 1,000 pairs and a revoking policy edit).
    #[arg(long)]
    auth_only: bool,
    /// Only the Kubernetes-source measurement: time to ready and RSS with this many realistic
    /// Pod objects (comma-separated sizes, such as 1000,10000,100000).
    #[arg(long, value_name = "N,N…", value_delimiter = ',')]
    kube_only: Vec<usize>,
}

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8081;
const COUNT_PORT: u16 = 8082;
/// stunnel's ports: the client's local accept port is `LOCAL + i`, the server's TLS port
/// `REMOTE + i`, for the i-th service (iperf, echo, count).
const STUNNEL_LOCAL: u16 = 15_200;
const STUNNEL_REMOTE: u16 = 25_200;
const SERVICES: [u16; 3] = [IPERF_PORT, ECHO_PORT, COUNT_PORT];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Setting {
    None,
    Portcullis,
    Stunnel,
    Nftables,
}

impl Setting {
    const ALL: [Self; 4] = [Self::None, Self::Portcullis, Self::Stunnel, Self::Nftables];

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Portcullis => "portcullis",
            Self::Stunnel => "stunnel",
            Self::Nftables => "nftables",
        }
    }
}

pub fn spec() -> Spec {
    Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    }
}

/// Processes killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The data-path scenarios' world: two testbeds (one plain, for none/stunnel/nftables; one
/// with agents) with servers running in the server pods.
struct World<'a> {
    plain: Scenario<'a>,
    pc: Scenario<'a>,
}

impl World<'_> {
    fn scenario(&self, s: Setting) -> &Scenario<'_> {
        if s == Setting::Portcullis {
            &self.pc
        } else {
            &self.plain
        }
    }

    /// Where the client connects for service `port` in setting `s`.
    fn target(&self, s: Setting, port: u16) -> String {
        if s == Setting::Stunnel {
            let i = SERVICES.iter().position(|p| *p == port).unwrap_or(0) as u16;
            return format!("127.0.0.1:{}", STUNNEL_LOCAL + i);
        }
        sock(self.scenario(s).addr("server", Family::V4), port)
    }
}

/// Starts the servers every scenario uses in `server`: iperf3, an echo server and a count
/// server (probe).
fn servers(s: &Scenario<'_>) -> Result<Procs> {
    let mut procs = Vec::new();
    procs.push(
        s.tb.exec("server", &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? ./dev installs it)")?,
    );
    for (port, echo) in [(ECHO_PORT, true), (COUNT_PORT, false)] {
        let port = port.to_string();
        let mut args = vec!["serve", "--port", port.as_str(), "--seconds", "3600"];
        if echo {
            args.push("--echo");
        }
        procs.push(
            s.probe_cmd("server", &args)
                .stdout(Stdio::null())
                .spawn()
                .context("starting probe serve")?,
        );
    }
    thread::sleep(Duration::from_millis(300));
    Ok(Procs(procs))
}

/// Mutual-TLS stunnel pairs between client and server of the plain testbed, with SVIDs from a
/// CA made by the agent binary.
fn stunnel(tb: &Testbed, agent: &Path) -> Result<Procs> {
    let dir = tb.state_dir().join("stunnel");
    std::fs::create_dir_all(&dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new(agent).args(args).output()?;
        if !out.status.success() {
            bail!(
                "portcullis {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    run(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        &d("ca"),
    ])?;
    for who in ["client", "server"] {
        run(&[
            "ca",
            "issue",
            "--ca",
            &d("ca"),
            "--spiffe-id",
            &format!("spiffe://cluster.local/ns/default/sa/{who}"),
            "--ttl",
            "24h",
            "--out",
            &d(who),
        ])?;
    }
    let server_ip = tb.pod("server").ipv4;
    let mut client_conf = String::new();
    let mut server_conf = String::new();
    for (conf, who) in [(&mut client_conf, "client"), (&mut server_conf, "server")] {
        let _ = writeln!(
            conf,
            "foreground = yes\npid =\ndebug = 3\noutput = {}\n",
            d(&format!("{who}.log"))
        );
    }
    for (i, port) in SERVICES.iter().enumerate() {
        let i = i as u16;
        let common = |who: &str| {
            format!(
                "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
                d(&format!("{who}/svid.pem")),
                d(&format!("{who}/svid.key")),
                d("ca/ca.pem")
            )
        };
        let _ = writeln!(
            client_conf,
            "[s{port}]\nclient = yes\naccept = 127.0.0.1:{}\nconnect = {server_ip}:{}\n{}",
            STUNNEL_LOCAL + i,
            STUNNEL_REMOTE + i,
            common("client")
        );
        let _ = writeln!(
            server_conf,
            "[s{port}]\naccept = 0.0.0.0:{}\nconnect = 127.0.0.1:{port}\nrequireCert = yes\n{}",
            STUNNEL_REMOTE + i,
            common("server")
        );
    }
    std::fs::write(dir.join("client.conf"), client_conf)?;
    std::fs::write(dir.join("server.conf"), server_conf)?;
    let mut procs = Vec::new();
    for who in ["server", "client"] {
        procs.push(
            tb.exec(who, &["stunnel4", &d(&format!("{who}.conf"))])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting stunnel4 (is it installed? ./dev installs it)")?,
        );
    }
    thread::sleep(Duration::from_millis(500));
    Ok(Procs(procs))
}

/// Adds (or removes) the nftables allowlist on node-2: the client may open connections to the
/// server's three ports; replies and everything else established pass; anything else to the
/// server is dropped.
fn nftables(tb: &Testbed, on: bool) -> Result<()> {
    let (client, server) = (tb.pod("client").ipv4, tb.pod("server").ipv4);
    let script = if on {
        format!(
            "table inet pcbench {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  ip daddr {server} ct state established,related accept\n  ip daddr {server} ip saddr {client} tcp dport {{ {IPERF_PORT}, {ECHO_PORT}, {COUNT_PORT} }} ct state new accept\n  ip daddr {server} drop\n }}\n}}\n"
        )
    } else {
        "delete table inet pcbench\n".to_owned()
    };
    let mut child = tb
        .exec_node("node-2", &["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed? ./dev installs it)")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("nft stdin")?,
        script.as_bytes(),
    )?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One iperf3 run; bits per second received.
fn iperf(s: &Scenario<'_>, target: &str, seconds: u32, streams: u32) -> Result<f64> {
    let (host, port) = target.rsplit_once(':').context("target")?;
    let out =
        s.tb.exec(
            "client",
            &[
                "iperf3",
                "-c",
                host,
                "-p",
                port,
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )
        .output()
        .context("running iperf3 -c")?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3 to {target}: {err}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

fn probe_json(s: &Scenario<'_>, args: &[&str]) -> Result<Value> {
    let v = s.probe("client", args);
    if !ok(&v) {
        bail!("probe {}: {v}", args.join(" "));
    }
    Ok(v)
}

/// Median and spread of a sample.
fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s.get(s.len() / 2).copied().unwrap_or(f64::NAN);
    json!({"median": median, "min": s.first(), "max": s.last(), "samples": v})
}

fn median_of(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(f64::NAN)
}

/// Sum of run_time_ns and run_cnt of the loaded programs named `name` (needs
/// `kernel.bpf_stats_enabled`).
fn prog_stats(name: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool")?;
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(progs
        .iter()
        .filter(|p| p["name"].as_str() == Some(name))
        .fold((0, 0), |(t, c), p| {
            (
                t + p["run_time_ns"].as_u64().unwrap_or(0),
                c + p["run_cnt"].as_u64().unwrap_or(0),
            )
        }))
}

/// The floor of the per-packet cost measurement on this machine: an empty tc program (it
/// returns "pass" and does nothing else), on both hooks of the server pod's host-side veth of
/// the plain testbed, measured like ours during one iperf3 run. `kernel.bpf_stats_enabled`
/// must be on.
fn program_floor(s: &Scenario<'_>, seconds: u32) -> Result<f64> {
    let dir = s.tb.state_dir().join("floor");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("empty.c");
    std::fs::write(
        &src,
        "#include <linux/bpf.h>\n#include <linux/pkt_cls.h>\n\
         __attribute__((section(\"tc\"), used)) int pc_floor(struct __sk_buff *skb) { return TC_ACT_OK; }\n\
         char _license[] __attribute__((section(\"license\"), used)) = \"GPL\";\n",
    )?;
    let obj = dir.join("empty.o");
    let out = std::process::Command::new("clang-22")
        .args([
            "-O2",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .context("running clang-22 (./dev installs it)")?;
    if !out.status.success() {
        bail!(
            "compiling the empty program: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let veth = s.tb.pod("server").host_veth.clone();
    let obj = obj.to_string_lossy().into_owned();
    let tc = |args: &[&str]| -> Result<()> {
        let mut full = vec!["tc"];
        full.extend_from_slice(args);
        let out = s.tb.exec_node("node-2", &full).output()?;
        if !out.status.success() {
            bail!(
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    tc(&["qdisc", "add", "dev", &veth, "clsact"])?;
    let measured = (|| -> Result<f64> {
        for hook in ["egress", "ingress"] {
            tc(&[
                "filter", "add", "dev", &veth, hook, "bpf", "da", "obj", &obj, "sec", "tc",
            ])?;
        }
        let (t0, c0) = prog_stats("pc_floor")?;
        iperf(
            s,
            &sock(s.addr("server", Family::V4), IPERF_PORT),
            seconds,
            1,
        )?;
        let (t1, c1) = prog_stats("pc_floor")?;
        #[expect(clippy::cast_precision_loss, reason = "an average")]
        Ok((t1 - t0) as f64 / c1.saturating_sub(c0).max(1) as f64)
    })();
    let _ = tc(&["qdisc", "del", "dev", &veth, "clsact"]);
    measured
}

/// A workload for the control-plane scenarios: no interface, one address.
pub fn scale_workload(
    name: &str,
    namespace: &str,
    service_account: &str,
    node: &str,
    address: std::net::IpAddr,
) -> testbed::Workload {
    testbed::Workload {
        name: name.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
        node: node.into(),
        addresses: vec![address],
        spiffe_id: None,
        extra: BTreeMap::default(),
    }
}

/// The number after `name` (such as `took_ms=`) in an agent log line.
pub fn log_field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(name)? + name.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: i64) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The CPU time process `pid` has used so far (user and system), in seconds.
fn cpu_seconds(pid: i64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends at the last ')': state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let sys: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "clock ticks")]
    Ok((ticks + sys) as f64 / hz as f64)
}

/// What `endpoint_scale` measured.
struct Scale {
    /// The agent's own `took_ms` for the reconciliation that programmed them.
    agent_ms: f64,
    /// From the cluster-state file write to programmed.
    wall_ms: f64,
    rss_kib: u64,
    /// The agent's CPU use afterwards, with nothing changing, in percent of one core.
    rest_cpu_pct: f64,
}

/// Control plane at scale: `n` workloads (10 per service account) on node-2 are added to
/// cluster state; the time until node-1's agent has programmed them all (from its own
/// `cluster state applied` record), its resident memory afterwards, and the CPU it uses once
/// nothing changes (measured over `rest`).
fn endpoint_scale(agent: &Path, n: usize, rest: Duration) -> Result<Scale> {
    let tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            ..Options::default()
        },
    )?;
    // JSON, as generators of files this size write them (the agent's fast decoder).
    tb.write_cluster_json(|c| {
        for i in 0..n {
            // 198.19.0.0/16 holds 64,000 of them; the rest go to fd00:19::/96.
            let address: std::net::IpAddr = if i < 64_000 {
                std::net::Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8).into()
            } else {
                std::net::Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
            };
            let sa = format!("sa{}", i / 10);
            c.workloads.push(scale_workload(
                &format!("w{i}"),
                "scale",
                &sa,
                "node-2",
                address,
            ));
        }
    })?;
    let start = Instant::now();
    let applied = |tb: &Testbed| {
        tb.agent_log("node-1")
            .lines()
            .filter(|l| l.contains("cluster state applied"))
            .filter_map(|l| Some((log_field(l, "endpoints_set=")?, log_field(l, "took_ms=")?)))
            .find(|(set, _)| *set as usize >= n)
            .map(|(_, ms)| ms)
    };
    let took_ms = loop {
        if let Some(ms) = applied(&tb) {
            if let Some(line) = tb
                .agent_log("node-1")
                .lines()
                .rfind(|l| l.contains("cluster state applied"))
            {
                eprintln!(
                    "  agent: {}",
                    line.split("INFO").last().unwrap_or(line).trim()
                );
            }
            break ms;
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("node-1 did not program {n} workloads' endpoints within 300 s");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let st = Scenario {
        tb: &tb,
        probe: PathBuf::new(),
    }
    .status("node-1");
    let pid = st["agent"]["pid"].as_i64().context("agent pid in status")?;
    let rss_kib = rss_kib(pid)?;
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    thread::sleep(rest);
    let rest_cpu_pct = 100.0 * (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
    Ok(Scale {
        agent_ms: took_ms as f64,
        wall_ms,
        rss_kib,
        rest_cpu_pct,
    })
}

/// Cold first connection for a new pair: connect() to established, in one setting.
fn first_connection(agent: &Path, probe: &Path, setting: &str) -> Result<f64> {
    let (agents, proactive, syn) = match setting {
        "none" => (false, None, None),
        "both off" => (true, Some(false), Some(0)),
        "SYN timeout only" => (true, Some(false), Some(20)),
        _ => (true, Some(true), Some(20)),
    };
    let tb = Testbed::up(
        &spec(),
        &Options {
            agents,
            agent_bin: Some(agent.to_owned()),
            authenticate: true,
            proactive,
            syn_rto_ms: syn,
            log_level: "warn".into(),
            ..Options::default()
        },
    )?;
    let s = Scenario {
        tb: &tb,
        probe: probe.to_owned(),
    };
    let _server = s.serve("server", COUNT_PORT);
    if proactive == Some(true) {
        let warm = eventually(Duration::from_secs(10), || {
            s.status("node-2")["auth"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
                && s.status("node-1")["auth"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        });
        if !warm {
            bail!("proactive authentication did not warm the pair within 10 s");
        }
    }
    let r = s.connect("client", s.addr("server", Family::V4), COUNT_PORT, 5000);
    if !ok(&r) {
        bail!("first connection ({setting}): {r}");
    }
    r["connect_ms"].as_f64().context("connect_ms")
}

/// A table row: the median of each setting with its spread, and the ratio to none.
fn row(
    md: &mut String,
    label: &str,
    unit: &str,
    per: &BTreeMap<Setting, Value>,
    fmt: fn(f64) -> String,
) {
    let none = per.get(&Setting::None).map_or(f64::NAN, median_of);
    let mut cells = Vec::new();
    for s in Setting::ALL {
        let Some(v) = per.get(&s) else {
            cells.push("–".to_owned());
            continue;
        };
        let m = median_of(v);
        let spread = match (v["min"].as_f64(), v["max"].as_f64()) {
            (Some(lo), Some(hi)) if v["samples"].as_array().is_some_and(|a| a.len() > 1) => {
                format!(" [{}–{}]", fmt(lo), fmt(hi))
            }
            _ => String::new(),
        };
        let ratio = if s == Setting::None {
            String::new()
        } else {
            format!(" ({:.3})", m / none)
        };
        cells.push(format!("{}{spread}{ratio}", fmt(m)));
    }
    let _ = writeln!(md, "| {label} ({unit}) | {} |", cells.join(" | "));
}

#[expect(clippy::too_many_lines, reason = "one linear script of measurements")]
pub fn run(args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks build network namespaces and load eBPF programs: run them as root");
    }
    let started = Instant::now();
    if let Some(n) = args.scale_only {
        let agent = cargo::build_agent_release()?;
        let m = endpoint_scale(&agent, n, Duration::from_secs(10))?;
        println!(
            "{n} endpoints: {:.0} ms in the agent, {:.0} ms from the file write, RSS {:.1} MiB, {:.1}% of a core at rest",
            m.agent_ms,
            m.wall_ms,
            m.rss_kib as f64 / 1024.0,
            m.rest_cpu_pct
        );
        return Ok(0);
    }
    if !args.kube_only.is_empty() {
        let agent = cargo::build_agent_release()?;
        println!("| Pod objects in the API | agent start → ready (s) | agent RSS (MiB) |");
        println!("| --- | --- | --- |");
        for n in &args.kube_only {
            let r = kube::ready(&agent, *n)?;
            println!(
                "| {} | {:.1} | {:.1} |",
                r.pods,
                r.ready_s,
                r.rss_kib as f64 / 1024.0
            );
        }
        return Ok(0);
    }
    if args.auth_only {
        let agent = cargo::build_agent_release()?;
        println!("{}", crate::auth_scale::run(&agent, 100, 1_000)?);
        return Ok(0);
    }
    let (reps, seconds, rr_count) = if args.quick {
        (1, 1, 2_000)
    } else {
        (args.reps.max(1), args.seconds.max(1), 20_000)
    };
    // Quick runs use the debug agent the tests already built; full runs the release build.
    let agent = if args.quick {
        cargo::agent_bin(None)?
    } else {
        cargo::build_agent_release()?
    };
    let probe = cargo::probe_bin()?;
    let plain_tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.clone()),
            ..Options::without_agents()
        },
    )?;
    let pc_tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.clone()),
            authenticate: true,
            log_level: "warn".into(),
            ..Options::default()
        },
    )?;
    let world = World {
        plain: Scenario {
            tb: &plain_tb,
            probe: probe.clone(),
        },
        pc: Scenario {
            tb: &pc_tb,
            probe: probe.clone(),
        },
    };
    let _plain_servers = servers(&world.plain)?;
    let _pc_servers = servers(&world.pc)?;
    let _stunnel = stunnel(&plain_tb, &agent)?;
    // The pair is authenticated by the agents themselves (proactive authentication).
    let authenticated = eventually(Duration::from_secs(15), || {
        let r = world.pc.connect(
            "client",
            world.pc.addr("server", Family::V4),
            COUNT_PORT,
            500,
        );
        ok(&r)
    });
    if !authenticated {
        bail!("the agents did not authenticate the pair within 15 s");
    }
    // Per-packet program cost: the kernel's BPF statistics, on only while we measure.
    let stats_were = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_default()
        .trim()
        .to_owned();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled")?;
    let before = [prog_stats("pc_to_pod")?, prog_stats("pc_from_pod")?];

    type Samples = BTreeMap<Setting, Vec<f64>>;
    let mut tput1: Samples = BTreeMap::new();
    let mut tput4: Samples = BTreeMap::new();
    let mut cps: Samples = BTreeMap::new();
    let mut rr: BTreeMap<Setting, Vec<Value>> = BTreeMap::new();
    for rep in 1..=reps {
        for setting in Setting::ALL {
            let s = world.scenario(setting);
            eprint!(
                "\rdata path: repetition {rep}/{reps}, {:<10}",
                setting.name()
            );
            if setting == Setting::Nftables {
                nftables(&plain_tb, true)?;
            }
            let result = (|| -> Result<()> {
                tput1.entry(setting).or_default().push(iperf(
                    s,
                    &world.target(setting, IPERF_PORT),
                    seconds,
                    1,
                )?);
                tput4.entry(setting).or_default().push(iperf(
                    s,
                    &world.target(setting, IPERF_PORT),
                    seconds,
                    4,
                )?);
                let r = probe_json(
                    s,
                    &[
                        "rr",
                        "--to",
                        &world.target(setting, ECHO_PORT),
                        "--count",
                        &rr_count.to_string(),
                        "--size",
                        "64",
                    ],
                )?;
                rr.entry(setting).or_default().push(r);
                let c = probe_json(
                    s,
                    &[
                        "cps",
                        "--to",
                        &world.target(setting, COUNT_PORT),
                        "--seconds",
                        &seconds.to_string(),
                    ],
                )?;
                cps.entry(setting)
                    .or_default()
                    .push(c["per_sec"].as_f64().unwrap_or(0.0));
                Ok(())
            })();
            if setting == Setting::Nftables {
                nftables(&plain_tb, false)?;
            }
            result?;
        }
    }
    eprintln!();
    let after = [prog_stats("pc_to_pod")?, prog_stats("pc_from_pod")?];
    eprintln!("program cost floor: an empty tc program on the same path…");
    let floor = program_floor(&world.plain, seconds);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &stats_were);
    let floor_ns = floor?;
    let admitted = world.pc.status("node-2")["counters"]["pass_authenticated"]
        .as_u64()
        .unwrap_or(0);
    if admitted == 0 {
        bail!("portcullis admitted no connection: the measurement did not go through the datapath");
    }
    let prog_cost: Vec<Value> = ["pc_to_pod", "pc_from_pod"]
        .iter()
        .zip(before.iter().zip(after.iter()))
        .map(|(name, ((t0, c0), (t1, c1)))| {
            let runs = c1.saturating_sub(*c0);
            #[expect(clippy::cast_precision_loss, reason = "an average")]
            let ns = if runs == 0 {
                f64::NAN
            } else {
                (t1 - t0) as f64 / runs as f64
            };
            json!({"program": name, "runs": runs, "ns_per_run": ns})
        })
        .collect();
    drop(world);
    drop((plain_tb, pc_tb));

    eprintln!("cold first connection in four settings…");
    let mut first = Vec::new();
    for setting in ["none", "both off", "SYN timeout only", "proactive"] {
        let ms = first_connection(&agent, &probe, setting)?;
        eprintln!("  {setting:<17} {ms:.2} ms");
        first.push(json!({"setting": setting, "connect_ms": ms}));
    }

    let counts: &[usize] = if args.quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let mut scale = Vec::new();
    for &n in counts {
        eprintln!("control plane: programming {n} endpoints…");
        let m = endpoint_scale(
            &agent,
            n,
            Duration::from_secs(if args.quick { 2 } else { 5 }),
        )?;
        #[expect(clippy::cast_precision_loss, reason = "MiB for display")]
        let rss_mib = m.rss_kib as f64 / 1024.0;
        eprintln!(
            "  {n} endpoints: {:.0} ms in the agent, {:.0} ms from the file write, RSS {rss_mib:.1} MiB, {:.1}% of a core at rest",
            m.agent_ms, m.wall_ms, m.rest_cpu_pct
        );
        scale.push(json!({
            "endpoints": n,
            "agent_ms": m.agent_ms,
            "wall_ms": m.wall_ms,
            "rss_kib": m.rss_kib,
            "rest_cpu_pct": m.rest_cpu_pct,
        }));
    }

    let (locals, remotes) = if args.quick { (10, 100) } else { (100, 1_000) };
    eprintln!(
        "control plane: {} auth entries, then a policy edit revoking {}…",
        locals * remotes,
        remotes - 1
    );
    let auth = crate::auth_scale::run(&agent, locals, remotes)?;
    eprintln!(
        "  {} entries written at {:.0}/s, RSS {:.1} → {:.1} MiB; revocation: {:.1} ms in the agent, {:.0} ms from the file write",
        auth["entries"],
        auth["entries_per_s"].as_f64().unwrap_or(f64::NAN),
        auth["rss_kib_before"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        auth["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        auth["revoke_agent_ms"].as_f64().unwrap_or(f64::NAN),
        auth["revoke_wall_ms"].as_f64().unwrap_or(f64::NAN),
    );

    eprintln!("handshakes: portcullis against a bare rustls loop…");
    let count = if args.quick { "50" } else { "300" };
    let mut hs_cmd = cargo::cargo();
    hs_cmd.args(["run", "-q"]);
    if !args.quick {
        hs_cmd.arg("--release");
    }
    let out = hs_cmd
        .args([
            "-p",
            "portcullis-agent",
            "--example",
            "handshake_bench",
            "--",
            count,
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the handshake benchmark")?;
    if !out.status.success() {
        bail!("the handshake benchmark failed ({})", out.status);
    }
    let hs: Value =
        serde_json::from_slice(out.stdout.trim_ascii()).context("handshake benchmark output")?;

    // Report.
    let to_stats = |m: &Samples| -> BTreeMap<Setting, Value> {
        m.iter().map(|(k, v)| (*k, stats(v))).collect()
    };
    let rr_field = |field: &str| -> BTreeMap<Setting, Value> {
        rr.iter()
            .map(|(k, v)| {
                let xs: Vec<f64> = v.iter().filter_map(|r| r[field].as_f64()).collect();
                (*k, stats(&xs))
            })
            .collect()
    };
    let gbit = |x: f64| format!("{:.2}", x / 1e9);
    let us = |x: f64| format!("{x:.1}");
    let int = |x: f64| format!("{x:.0}");
    let (t1, t4, c) = (to_stats(&tput1), to_stats(&tput4), to_stats(&cps));
    let (p50, p99, p999) = (rr_field("p50_us"), rr_field("p99_us"), rr_field("p999_us"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Data path, client on node-1 → server on node-2, {reps} repetition(s): median [min–max] (ratio to none)\n"
    );
    let _ = writeln!(
        md,
        "| scenario | none | portcullis | stunnel (user-space mTLS) | nftables allowlist |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    row(
        &mut md,
        &format!("TCP throughput, 1 stream, {seconds} s"),
        "Gbit/s",
        &t1,
        gbit,
    );
    row(
        &mut md,
        &format!("TCP throughput, 4 streams, {seconds} s"),
        "Gbit/s",
        &t4,
        gbit,
    );
    row(
        &mut md,
        &format!("request/response p50, 64 B, {rr_count} round trips"),
        "µs",
        &p50,
        us,
    );
    row(&mut md, "request/response p99", "µs", &p99, us);
    row(&mut md, "request/response p99.9", "µs", &p999, us);
    row(
        &mut md,
        &format!("new connections per second, {seconds} s"),
        "conn/s",
        &c,
        int,
    );
    let _ = writeln!(
        md,
        "\n| program | average cost per packet (ns) | packets measured |"
    );
    let _ = writeln!(md, "| --- | --- | --- |");
    let _ = writeln!(
        md,
        "| an empty tc program (the measurement's floor here) | {floor_ns:.0} | – |"
    );
    for p in &prog_cost {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} |",
            p["program"].as_str().unwrap_or(""),
            p["ns_per_run"].as_f64().unwrap_or(f64::NAN),
            p["runs"]
        );
    }
    let _ = writeln!(
        md,
        "\n| cold first connection, new pair | connect() to established (ms) |"
    );
    let _ = writeln!(md, "| --- | --- |");
    for f in &first {
        let _ = writeln!(
            md,
            "| {} | {:.2} |",
            f["setting"].as_str().unwrap_or(""),
            f["connect_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(
        md,
        "\n| endpoints added to cluster state | programmed by the agent (ms) | file write → programmed (ms, incl. the 500 ms poll) | agent RSS after (MiB) | agent CPU at rest after (% of a core) |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    for s in &scale {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} |",
            s["endpoints"],
            s["agent_ms"].as_f64().unwrap_or(f64::NAN),
            s["wall_ms"].as_f64().unwrap_or(f64::NAN),
            s["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            s["rest_cpu_pct"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(
        md,
        "\n| auth entries written through the admin API | entries/s | agent RSS before → after (MiB) | policy edit revoking {} of them: agent (ms) | file write → revoked (ms, {} ms poll) |",
        auth["revoked"], auth["poll_interval_ms"]
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let _ = writeln!(
        md,
        "| {} | {:.0} | {:.1} → {:.1} | {:.1} | {:.0} |",
        auth["entries"],
        auth["entries_per_s"].as_f64().unwrap_or(f64::NAN),
        auth["rss_kib_before"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        auth["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        auth["revoke_agent_ms"].as_f64().unwrap_or(f64::NAN),
        auth["revoke_wall_ms"].as_f64().unwrap_or(f64::NAN),
    );
    let (bl, bh) = minmax(&hs["bare_rustls_per_sec"]);
    let (ol, oh) = minmax(&hs["portcullis_per_sec"]);
    let _ = writeln!(
        md,
        "\n| handshakes | bare rustls (/s) | portcullis (/s) | ratio to bare |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    let _ = writeln!(
        md,
        "| mutual TLS 1.3 on loopback, sequential ({count} × 3, median [min–max]) | {:.0} [{bl:.0}–{bh:.0}] | {:.0} [{ol:.0}–{oh:.0}] | {:.3} |",
        hs["median"]["bare_rustls_per_sec"].as_f64().unwrap_or(0.0),
        hs["median"]["portcullis_per_sec"].as_f64().unwrap_or(0.0),
        hs["ratio_to_bare"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        md,
        "\nSVID issuance (built-in CA, ECDSA P-256): {:.0} µs each",
        hs["svid_issue_us"].as_f64().unwrap_or(0.0)
    );
    // Goals (ratios within this run).
    let none1 = median_of(&t1[&Setting::None]);
    let ratio = |m: &BTreeMap<Setting, Value>| {
        median_of(&m[&Setting::Portcullis]) / median_of(&m[&Setting::None])
    };
    let added = |m: &BTreeMap<Setting, Value>| {
        median_of(&m[&Setting::Portcullis]) - median_of(&m[&Setting::None])
    };
    let first_ms = |name: &str| {
        first
            .iter()
            .find(|f| f["setting"] == name)
            .and_then(|f| f["connect_ms"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let max_cost = prog_cost
        .iter()
        .filter_map(|p| p["ns_per_run"].as_f64())
        .fold(f64::NAN, f64::max);
    let big = scale.last().cloned().unwrap_or(Value::Null);
    let goals = vec![
        (
            "throughput ≥ 0.97 × none (1 stream)",
            ratio(&t1) >= 0.97,
            format!("{:.3}", ratio(&t1)),
        ),
        (
            "added latency p50 < 2 µs",
            added(&p50) < 2.0,
            format!("{:+.1} µs", added(&p50)),
        ),
        (
            "added latency p99 < 10 µs",
            added(&p99) < 10.0,
            format!("{:+.1} µs", added(&p99)),
        ),
        (
            "new connections/s ≥ 0.95 × none",
            ratio(&c) >= 0.95,
            format!("{:.3}", ratio(&c)),
        ),
        (
            "first connection, proactive: no slower than none",
            first_ms("proactive") <= first_ms("none") * 1.5 + 0.2,
            format!(
                "{:.2} ms vs {:.2} ms",
                first_ms("proactive"),
                first_ms("none")
            ),
        ),
        (
            "first connection, SYN timeout only < 50 ms",
            first_ms("SYN timeout only") < 50.0,
            format!(
                "{:.1} ms (drop and retransmit: {:.0} ms)",
                first_ms("SYN timeout only"),
                first_ms("both off")
            ),
        ),
        (
            "handshake rate ≥ 0.8 × bare rustls",
            hs["ratio_to_bare"].as_f64().unwrap_or(0.0) >= 0.8,
            format!("{:.3}", hs["ratio_to_bare"].as_f64().unwrap_or(0.0)),
        ),
        (
            "program cost < 100 ns per packet",
            max_cost < 100.0,
            format!("{max_cost:.0} ns (an empty program: {floor_ns:.0} ns)"),
        ),
        (
            "100,000 endpoints in < 1 s, RSS < 64 MiB",
            big["endpoints"] == 100_000
                && big["agent_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0
                && big["rss_kib"].as_f64().unwrap_or(f64::MAX) < 64.0 * 1024.0,
            format!(
                "{} endpoints: {:.0} ms, {:.1} MiB",
                big["endpoints"],
                big["agent_ms"].as_f64().unwrap_or(f64::NAN),
                big["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
            ),
        ),
    ];
    let _ = writeln!(md, "\n| goal | met | measured |");
    let _ = writeln!(md, "| --- | --- | --- |");
    for (goal, met, measured) in &goals {
        let _ = writeln!(
            md,
            "| {goal} | {} | {measured} |",
            if *met { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        md,
        "\n`cargo xtask bench{}` in {:.0} s; none throughput {:.2} Gbit/s.",
        if args.quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64(),
        none1 / 1e9
    );
    println!("\n{md}");
    let named = |m: &BTreeMap<Setting, Value>| -> Value {
        m.iter()
            .map(|(k, v)| (k.name().to_owned(), v.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let report = json!({
        "command": format!("cargo xtask bench{}", if args.quick { " --quick" } else { "" }),
        "reps": reps,
        "seconds": seconds,
        "scenarios": {
            "throughput_1_stream": {"unit": "bit/s", "settings": named(&t1)},
            "throughput_4_streams": {"unit": "bit/s", "settings": named(&t4)},
            "rr_latency": {"unit": "µs", "p50": named(&p50), "p99": named(&p99), "p999": named(&p999)},
            "connections_per_second": {"unit": "conn/s", "settings": named(&c)},
            "first_connection": first,
            "program_cost": prog_cost,
            "program_cost_floor_ns": floor_ns,
            "handshakes": hs,
            "endpoint_scale": scale,
            "auth_scale": auth,
        },
        "goals": goals.iter().map(|(g, met, m)| json!({"goal": g, "met": met, "measured": m})).collect::<Vec<_>>(),
    });
    let out_dir = match args.out {
        Some(d) => d,
        None => cargo::target_dir()?.join("bench"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(
        out_dir.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("bench.md"), &md)?;
    println!(
        "results: {}/bench.json, {}/bench.md",
        out_dir.display(),
        out_dir.display()
    );
    Ok(0)
}

fn minmax(v: &Value) -> (f64, f64) {
    let xs: Vec<f64> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    (
        xs.iter().copied().fold(f64::MAX, f64::min),
        xs.iter().copied().fold(f64::MIN, f64::max),
    )
}

/// The scenarios `bench.json` must hold (checked by the CI smoke run).
pub const SCENARIOS: [&str; 9] = [
    "throughput_1_stream",
    "throughput_4_streams",
    "rr_latency",
    "connections_per_second",
    "first_connection",
    "program_cost",
    "handshakes",
    "endpoint_scale",
    "auth_scale",
];

/// Checks a `bench.json`: well-formed, every scenario present, every setting measured.
pub fn check_report(path: &Path) -> Result<()> {
    let v: Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    for s in SCENARIOS {
        if v["scenarios"][s].is_null() {
            bail!("{}: scenario `{s}` is missing", path.display());
        }
    }
    for s in [
        "throughput_1_stream",
        "throughput_4_streams",
        "connections_per_second",
    ] {
        for setting in Setting::ALL {
            if v["scenarios"][s]["settings"][setting.name()]["median"]
                .as_f64()
                .is_none()
            {
                bail!(
                    "{}: `{s}` has no result for `{}`",
                    path.display(),
                    setting.name()
                );
            }
        }
    }
    if v["scenarios"]["first_connection"].as_array().map(Vec::len) != Some(4) {
        bail!(
            "{}: first_connection needs its four settings",
            path.display()
        );
    }
    Ok(())
}
