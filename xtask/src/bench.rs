//! `cargo xtask bench`: measurements on the testbed, each against a baseline measured in the
//! same run. Today: bulk TCP throughput between pods on two nodes, with no enforcement
//! ("none") and with portcullis enforcing an authenticated pair. Runs alternate between the
//! two settings so that drift on a shared machine hits both alike.

use std::{fmt::Write as _, path::PathBuf, process::Stdio, thread, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    NodeSpec, Options, PodSpec, Spec, Testbed,
    scenario::{Family, Scenario},
};

use crate::cargo;

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions per setting.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// A short run for smoke tests (1 repetition of 2 s).
    #[arg(long)]
    quick: bool,
    /// Where the JSON and Markdown results go (default: <target>/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn spec() -> Spec {
    Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    }
}

/// One iperf3 run from `client` to `server`; bits per second received.
fn iperf(s: &Scenario<'_>, seconds: u32) -> Result<f64> {
    let mut server =
        s.tb.exec("server", &["iperf3", "-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? ./dev installs it)")?;
    thread::sleep(Duration::from_millis(300));
    let to = s.addr("server", Family::V4).to_string();
    let out =
        s.tb.exec(
            "client",
            &[
                "iperf3",
                "-c",
                &to,
                "-p",
                "5201",
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        )
        .output()
        .context("running iperf3 -c")?;
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

/// Control plane at scale: `n` workloads (10 per service account) on node-2 are added to
/// cluster state; the time until node-1's agent has programmed them all (from its own
/// `cluster state applied` record) and its resident memory afterwards.
fn endpoint_scale(agent: &std::path::Path, n: usize) -> Result<(f64, f64, u64)> {
    let tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent.to_owned()),
            log_level: "info".into(),
            ..Options::default()
        },
    )?;
    let base = tb.cluster()?.workloads.len();
    tb.write_cluster(|c| {
        for i in 0..n {
            // 198.19.0.0/16 holds 64,000 of them; the rest go to fd00:19::/96.
            let address: std::net::IpAddr = if i < 64_000 {
                std::net::Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8).into()
            } else {
                std::net::Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
            };
            c.workloads.push(testbed::Workload {
                name: format!("w{i}"),
                namespace: "scale".into(),
                service_account: format!("sa{}", i / 10),
                node: "node-2".into(),
                addresses: vec![address],
                spiffe_id: None,
                extra: Default::default(),
            });
        }
    })?;
    let start = std::time::Instant::now();
    let want = base + n;
    let log_has = |tb: &Testbed| {
        tb.agent_log("node-1")
            .lines()
            .filter(|l| l.contains("cluster state applied"))
            .filter_map(|l| {
                let field = |name: &str| -> Option<u64> {
                    let at = l.find(name)? + name.len();
                    l[at..]
                        .split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                };
                Some((field("endpoints_set=")?, field("took_ms=")?))
            })
            .find(|(set, _)| *set as usize >= n)
            .map(|(_, ms)| ms)
    };
    let took_ms = loop {
        if let Some(ms) = log_has(&tb) {
            break ms;
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("node-1 did not program {want} workloads' endpoints within 300 s");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let st = Scenario {
        tb: &tb,
        probe: PathBuf::new(),
    }
    .status("node-1");
    let pid = st["agent"]["pid"].as_u64().context("agent pid in status")?;
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
    Ok((took_ms as f64, wall_ms, rss_kib))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks build network namespaces and load eBPF programs: run them as root");
    }
    let (reps, seconds) = if args.quick {
        (1, 2)
    } else {
        (args.reps.max(1), args.seconds.max(1))
    };
    let agent = cargo::agent_bin(None)?;
    let probe = cargo::probe_bin()?;
    let none_tb = Testbed::up(&spec(), &Options::without_agents())?;
    let pc_tb = Testbed::up(
        &spec(),
        &Options {
            agent_bin: Some(agent),
            log_level: "warn".into(),
            ..Options::default()
        },
    )?;
    let none = Scenario {
        tb: &none_tb,
        probe: probe.clone(),
    };
    let pc = Scenario { tb: &pc_tb, probe };
    pc.allow("server", "client");
    let mut results: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 1..=reps {
        for (i, (name, s)) in [("none", &none), ("portcullis", &pc)]
            .into_iter()
            .enumerate()
        {
            eprint!("\rthroughput: repetition {rep}/{reps}, {name:<10} ");
            results[i].push(iperf(s, seconds)?);
        }
    }
    eprintln!();
    let st = pc.status("node-2");
    let admitted = st["counters"]["pass_authenticated"].as_u64().unwrap_or(0);
    if admitted == 0 {
        bail!("portcullis admitted no connection: the measurement did not go through the datapath");
    }
    let [mut a, mut b] = results.clone();
    let (none_med, pc_med) = (median(&mut a), median(&mut b));
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (lo / 1e9, hi / 1e9)
    };
    let ratio = pc_med / none_med;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | none (Gbit/s) | portcullis (Gbit/s) | ratio to none |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    let (nl, nh) = spread(&results[0]);
    let (pl, ph) = spread(&results[1]);
    let _ = writeln!(
        md,
        "| TCP throughput, 1 stream, node-1 → node-2 ({reps}×{seconds} s, median [min–max]) | {:.2} [{nl:.2}–{nh:.2}] | {:.2} [{pl:.2}–{ph:.2}] | {ratio:.3} |",
        none_med / 1e9,
        pc_med / 1e9
    );
    drop((none, pc));
    drop((none_tb, pc_tb));
    let counts: &[usize] = if args.quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let mut scale = Vec::new();
    let release = cargo::build_agent_release()?;
    let _ = writeln!(
        md,
        "\n| endpoints added to cluster state | programmed by the agent (ms) | file write → programmed (ms, incl. the 500 ms poll) | agent RSS after (MiB) |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for &n in counts {
        eprintln!("control plane: programming {n} endpoints…");
        let (agent_ms, wall_ms, rss_kib) = endpoint_scale(&release, n)?;
        #[expect(clippy::cast_precision_loss, reason = "MiB for display")]
        let rss_mib = rss_kib as f64 / 1024.0;
        eprintln!(
            "  {n} endpoints: {agent_ms:.0} ms in the agent, {wall_ms:.0} ms from the file write, RSS {rss_mib:.1} MiB"
        );
        let _ = writeln!(md, "| {n} | {agent_ms:.0} | {wall_ms:.0} | {rss_mib:.1} |");
        scale.push(
            json!({"endpoints": n, "agent_ms": agent_ms, "wall_ms": wall_ms, "rss_kib": rss_kib}),
        );
    }
    eprintln!("handshakes: portcullis against a bare rustls loop (release build)…");
    let count = if args.quick { "50" } else { "300" };
    let out = cargo::cargo()
        .args([
            "run",
            "-q",
            "--release",
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
    let spread = |v: &Value| {
        let xs: Vec<f64> = v
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let lo = xs.iter().copied().fold(f64::MAX, f64::min);
        let hi = xs.iter().copied().fold(f64::MIN, f64::max);
        (lo, hi)
    };
    let (bl, bh) = spread(&hs["bare_rustls_per_sec"]);
    let (ol, oh) = spread(&hs["portcullis_per_sec"]);
    let _ = writeln!(
        md,
        "\n| scenario | bare rustls (/s) | portcullis (/s) | ratio to bare |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    let _ = writeln!(
        md,
        "| mutual TLS 1.3 handshakes on loopback, sequential ({count} × 3, median [min–max]) | {:.0} [{bl:.0}–{bh:.0}] | {:.0} [{ol:.0}–{oh:.0}] | {:.3} |",
        hs["median"]["bare_rustls_per_sec"].as_f64().unwrap_or(0.0),
        hs["median"]["portcullis_per_sec"].as_f64().unwrap_or(0.0),
        hs["ratio_to_bare"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        md,
        "\nSVID issuance (built-in CA, ECDSA P-256): {:.0} µs each",
        hs["svid_issue_us"].as_f64().unwrap_or(0.0)
    );
    println!("\n{md}");
    let out_dir = match args.out {
        Some(d) => d,
        None => cargo::target_dir()?.join("bench"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let report = json!({
        "command": format!("cargo xtask bench{}", if args.quick { " --quick" } else { "" }),
        "scenarios": {
            "throughput_1_stream": {
                "unit": "bit/s",
                "none": results[0],
                "portcullis": results[1],
                "median": { "none": none_med, "portcullis": pc_med },
                "ratio_to_none": ratio,
            },
            "handshakes": hs,
            "endpoint_scale": scale,
        }
    });
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
