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
