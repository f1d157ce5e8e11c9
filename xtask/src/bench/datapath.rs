//! The data-path scenarios: throughput, request/response latency and connection rate,
//! client on node-1 → server on node-2, in four settings measured in the same run and
//! alternated within each repetition (so that a noisy, shared machine hits all alike):
//! - `none`: the same testbed with no enforcement;
//! - `portcullis`: agents enforcing, the pair authenticated by the agents (a workload proof
//!   inside their node session, protocol version 2);
//! - `stunnel`: stunnel client/server pairs with mutual TLS between the same pods (the
//!   user-space proxy model: every byte through a proxy);
//! - `nftables`: a conventional kernel filter on the server's node admitting the pair by
//!   address (conntrack, established/related).
//!
//! Also the programs' per-packet cost (the kernel's BPF statistics during those runs) and the
//! floor of that measurement on the same path (an empty tc program).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    Options, Testbed,
    scenario::{Family, Scenario, eventually, ok, sock},
};

use super::{
    table::{Section, Table},
    util::{median_of, spec, stats},
};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8081;
/// The count server's port (also the first-connection scenario's).
pub const COUNT_PORT: u16 = 8082;
/// stunnel's ports: the client's local accept port is `LOCAL + i`, the server's TLS port
/// `REMOTE + i`, for the i-th service (iperf, echo, count).
const STUNNEL_LOCAL: u16 = 15_200;
const STUNNEL_REMOTE: u16 = 25_200;
const SERVICES: [u16; 3] = [IPERF_PORT, ECHO_PORT, COUNT_PORT];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setting {
    None,
    Portcullis,
    Stunnel,
    Nftables,
}

impl Setting {
    pub const ALL: [Self; 4] = [Self::None, Self::Portcullis, Self::Stunnel, Self::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Portcullis => "portcullis",
            Self::Stunnel => "stunnel",
            Self::Nftables => "nftables",
        }
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

/// A table row: the median of each setting with its spread, and the ratio to none.
fn row(
    table: &mut Table,
    label: &str,
    unit: &str,
    per: &BTreeMap<Setting, Value>,
    fmt: fn(f64) -> String,
) {
    let none = per.get(&Setting::None).map_or(f64::NAN, median_of);
    let mut cells = vec![format!("{label} ({unit})")];
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
    table.row(cells);
}

/// How much of the data path to measure.
pub struct Plan {
    pub reps: u32,
    /// Seconds per throughput and connection-rate run.
    pub seconds: u32,
    /// Round trips per request/response run.
    pub rr_count: u32,
}

impl Plan {
    /// `--quick`: one repetition of 1 s runs; else what was asked (at least 1 of each).
    pub fn new(quick: bool, reps: u32, seconds: u32) -> Self {
        if quick {
            Self {
                reps: 1,
                seconds: 1,
                rr_count: 2_000,
            }
        } else {
            Self {
                reps: reps.max(1),
                seconds: seconds.max(1),
                rr_count: 20_000,
            }
        }
    }
}

type Samples = BTreeMap<Setting, Vec<f64>>;

/// What the repetitions measured, per setting.
#[derive(Default)]
struct Measured {
    tput1: Samples,
    tput4: Samples,
    cps: Samples,
    rr: BTreeMap<Setting, Vec<Value>>,
}

impl Measured {
    /// One repetition of every measurement in one setting.
    fn one(&mut self, world: &World<'_>, setting: Setting, plan: &Plan) -> Result<()> {
        let s = world.scenario(setting);
        let iperf_to = world.target(setting, IPERF_PORT);
        self.tput1
            .entry(setting)
            .or_default()
            .push(iperf(s, &iperf_to, plan.seconds, 1)?);
        self.tput4
            .entry(setting)
            .or_default()
            .push(iperf(s, &iperf_to, plan.seconds, 4)?);
        let r = probe_json(
            s,
            &[
                "rr",
                "--to",
                &world.target(setting, ECHO_PORT),
                "--count",
                &plan.rr_count.to_string(),
                "--size",
                "64",
            ],
        )?;
        self.rr.entry(setting).or_default().push(r);
        let c = probe_json(
            s,
            &[
                "cps",
                "--to",
                &world.target(setting, COUNT_PORT),
                "--seconds",
                &plan.seconds.to_string(),
            ],
        )?;
        self.cps
            .entry(setting)
            .or_default()
            .push(c["per_sec"].as_f64().unwrap_or(0.0));
        Ok(())
    }
}

/// Every repetition, alternating the settings within each; the nftables allowlist is on only
/// while its setting runs.
fn measure(world: &World<'_>, plan: &Plan) -> Result<Measured> {
    let mut m = Measured::default();
    for rep in 1..=plan.reps {
        for setting in Setting::ALL {
            eprint!(
                "\rdata path: repetition {rep}/{}, {:<10}",
                plan.reps,
                setting.name()
            );
            if setting == Setting::Nftables {
                nftables(world.plain.tb, true)?;
            }
            let result = m.one(world, setting, plan);
            if setting == Setting::Nftables {
                nftables(world.plain.tb, false)?;
            }
            result?;
        }
    }
    eprintln!();
    Ok(m)
}

/// The kernel's BPF run-time statistics, on while this lives (they cost on every program
/// run, so only while measuring); the previous setting is restored on drop.
struct BpfStats(String);

impl BpfStats {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let were = std::fs::read_to_string(Self::SYSCTL)
            .unwrap_or_default()
            .trim()
            .to_owned();
        std::fs::write(Self::SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(were))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, &self.0);
    }
}

/// Our programs' average cost per run between two readings of their statistics.
fn program_cost(before: &[(u64, u64); 2], after: &[(u64, u64); 2]) -> Vec<Value> {
    ["pc_to_pod", "pc_from_pod"]
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
        .collect()
}

/// The two testbeds (plain, and with agents that authenticate the pair themselves), their
/// servers and the stunnel pairs, then every repetition and the program cost with its floor.
pub fn run(agent: &Path, probe: &Path, plan: &Plan) -> Result<Section> {
    let plain_tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            ..Options::without_agents()
        },
    )?;
    let pc_tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            authenticate: true,
            log_level: "warn".into(),
            ..Options::default()
        },
    )?;
    let world = World {
        plain: Scenario {
            tb: &plain_tb,
            probe: probe.to_owned(),
        },
        pc: Scenario {
            tb: &pc_tb,
            probe: probe.to_owned(),
        },
    };
    let _plain_servers = servers(&world.plain)?;
    let _pc_servers = servers(&world.pc)?;
    let _stunnel = stunnel(&plain_tb, agent)?;
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
    let bpf_stats = BpfStats::enable()?;
    let before = [prog_stats("pc_to_pod")?, prog_stats("pc_from_pod")?];
    let measured = measure(&world, plan)?;
    let after = [prog_stats("pc_to_pod")?, prog_stats("pc_from_pod")?];
    eprintln!("program cost floor: an empty tc program on the same path…");
    let floor = program_floor(&world.plain, plan.seconds);
    drop(bpf_stats);
    let floor_ns = floor?;
    let admitted = world.pc.status("node-2")["counters"]["pass_authenticated"]
        .as_u64()
        .unwrap_or(0);
    if admitted == 0 {
        bail!("portcullis admitted no connection: the measurement did not go through the datapath");
    }
    Ok(render(
        plan,
        &measured,
        &program_cost(&before, &after),
        floor_ns,
    ))
}

/// The settings' statistics by name, for bench.json.
fn named(m: &BTreeMap<Setting, Value>) -> Value {
    m.iter()
        .map(|(k, v)| (k.name().to_owned(), v.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The data-path table, the program-cost table and their bench.json entries.
fn render(plan: &Plan, m: &Measured, prog_cost: &[Value], floor_ns: f64) -> Section {
    let to_stats = |s: &Samples| -> BTreeMap<Setting, Value> {
        s.iter().map(|(k, v)| (*k, stats(v))).collect()
    };
    let rr_field = |field: &str| -> BTreeMap<Setting, Value> {
        m.rr.iter()
            .map(|(k, v)| {
                let xs: Vec<f64> = v.iter().filter_map(|r| r[field].as_f64()).collect();
                (*k, stats(&xs))
            })
            .collect()
    };
    let gbit = |x: f64| format!("{:.2}", x / 1e9);
    let us = |x: f64| format!("{x:.1}");
    let int = |x: f64| format!("{x:.0}");
    let (t1, t4, c) = (to_stats(&m.tput1), to_stats(&m.tput4), to_stats(&m.cps));
    let (p50, p99, p999) = (rr_field("p50_us"), rr_field("p99_us"), rr_field("p999_us"));
    let (seconds, rr_count) = (plan.seconds, plan.rr_count);
    let mut t = Table::new([
        "scenario",
        "none",
        "portcullis",
        "stunnel (user-space mTLS)",
        "nftables allowlist",
    ]);
    let throughput = |streams| format!("TCP throughput, {streams}, {seconds} s");
    row(&mut t, &throughput("1 stream"), "Gbit/s", &t1, gbit);
    row(&mut t, &throughput("4 streams"), "Gbit/s", &t4, gbit);
    let rr_label = format!("request/response p50, 64 B, {rr_count} round trips");
    row(&mut t, &rr_label, "µs", &p50, us);
    row(&mut t, "request/response p99", "µs", &p99, us);
    row(&mut t, "request/response p99.9", "µs", &p999, us);
    let cps_label = format!("new connections per second, {seconds} s");
    row(&mut t, &cps_label, "conn/s", &c, int);
    let mut cost = Table::new([
        "program",
        "average cost per packet (ns)",
        "packets measured",
    ]);
    cost.row([
        "an empty tc program (the measurement's floor here)".to_owned(),
        format!("{floor_ns:.0}"),
        "–".to_owned(),
    ]);
    for p in prog_cost {
        cost.row([
            p["program"].as_str().unwrap_or("").to_owned(),
            format!("{:.0}", p["ns_per_run"].as_f64().unwrap_or(f64::NAN)),
            p["runs"].to_string(),
        ]);
    }
    Section::default()
        .md(format!(
            "Data path, client on node-1 → server on node-2, {} repetition(s): median [min–max] (ratio to none)\n",
            plan.reps
        ))
        .md(t.finish())
        .md(cost.finish())
        .json("throughput_1_stream", json!({"unit": "bit/s", "settings": named(&t1)}))
        .json("throughput_4_streams", json!({"unit": "bit/s", "settings": named(&t4)}))
        .json(
            "rr_latency",
            json!({"unit": "µs", "p50": named(&p50), "p99": named(&p99), "p999": named(&p999)}),
        )
        .json("connections_per_second", json!({"unit": "conn/s", "settings": named(&c)}))
        .json("program_cost", Value::Array(prog_cost.to_vec()))
        .json("program_cost_floor_ns", json!(floor_ns))
}
