//! `cargo xtask bench`: measurements on the testbed, each against baselines measured in the
//! same run, so that a shared, noisy machine hits every setting alike.
//!
//! One module per scenario below `bench/`; each measures, then hands the report a
//! [`table::Section`]: its entries of `bench.json` and its blocks of `bench.md`, written through the
//! one table writer ([`table::Table`]). This module only picks the agent, runs the scenarios
//! in order (or one of them, for the `--*-only` and `--churn` shortcuts), judges the goals and
//! writes the report.
//!
//! Output: a table on stdout with progress on stderr, and `bench.json` / `bench.md`.

mod auth_scale;
mod churn;
mod cni;
mod datapath;
mod endpoints;
mod first_connection;
mod frames;
mod handshakes;
mod issuer;
mod kube;
mod mac;
mod table;
mod util;
mod warmup;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use table::Table;
use util::num;

use crate::cargo;

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
    /// The agent binary to measure, instead of building one from this checkout (default: env
    /// PORTCULLIS_BIN, else `cargo build`, release, or debug for `--quick`).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Only the control-plane measurement, with this many endpoints (for profiling).
    #[arg(long, value_name = "N")]
    scale_only: Option<usize>,
    /// Only the auth-entry measurement (100 × 1,000 pairs and a revoking policy edit).
    #[arg(long)]
    auth_only: bool,
    /// Only the proactive warm-up measurement: this many pairs (default 10,000, as 100 × 100)
    /// between a group of workloads on node-1 and one on node-2, timed until both agents hold
    /// every entry.
    #[arg(long, value_name = "PAIRS", num_args = 0..=1, default_missing_value = "10000")]
    warmup_only: Option<usize>,
    /// Only the SVID issuer measurement: signed SVIDs per second (100 nodes × 30 workloads),
    /// an issuer restart, and agent start-up with source `issuer` against `ca` on a two-node
    /// testbed.
    #[arg(long)]
    issuer_only: bool,
    /// Only the connection-MAC measurement: new connections per second with policy
    /// `syn_mac: require` against `off`, and what signing and checking add per SYN in the
    /// kernel (BPF_PROG_TEST_RUN on the live programs); `--reps`, `--seconds` and `--quick`
    /// apply.
    #[arg(long)]
    mac_only: bool,
    /// Only the CNI measurement: ADD with `portcullis-cni` chained against the same chain
    /// without it, on a `ptp` and a `bridge` node, and a pod added while the agent is down
    /// (`--quick`: 3 pods of each kind per node instead of 40).
    #[arg(long)]
    cni_only: bool,
    /// Only the Kubernetes-source measurement: time to ready and RSS with this many realistic
    /// Pod objects (comma-separated sizes, such as 1000,10000,100000).
    #[arg(long, value_name = "N,N…", value_delimiter = ',')]
    kube_only: Vec<usize>,
    /// Only the churn measurement (one pod change at a time, at fixed rates, through the
    /// Kubernetes and the file source), at 1,000, 10,000 and 100,000 workloads; with
    /// `--quick`, its smoke-run form.
    #[arg(long)]
    churn: bool,
    /// The churn measurement's sizes (implies `--churn`).
    #[arg(long, value_name = "N,N…", value_delimiter = ',')]
    churn_sizes: Vec<usize>,
}

/// The agent to measure: `--agent`, else PORTCULLIS_BIN, else built from this checkout
/// (release, or debug when `release` is false: the build the tests already made).
fn agent(args: &Args, release: bool) -> Result<PathBuf> {
    let given = args.agent.clone().or_else(|| {
        std::env::var_os("PORTCULLIS_BIN")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    let bin = match given {
        Some(p) => p,
        None if release => cargo::build_agent_release()?,
        None => cargo::build_agent()?,
    };
    if !bin.is_file() {
        bail!("the agent binary {} does not exist", bin.display());
    }
    // Absolute: the testbed runs it from other directories.
    let bin = bin
        .canonicalize()
        .with_context(|| format!("resolving {}", bin.display()))?;
    eprintln!("agent: {}", bin.display());
    Ok(bin)
}

pub fn run(args: Args) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks build network namespaces and load eBPF programs: run them as root");
    }
    if let Some(n) = args.scale_only {
        return endpoints::only(&agent(&args, true)?, n);
    }
    if !args.kube_only.is_empty() {
        return kube::only(&agent(&args, true)?, &args.kube_only);
    }
    if args.auth_only {
        return auth_scale::only(&agent(&args, true)?);
    }
    if let Some(pairs) = args.warmup_only {
        return warmup::only(&agent(&args, true)?, pairs);
    }
    if args.issuer_only {
        return issuer::only(&agent(&args, true)?);
    }
    if args.mac_only {
        let plan = mac::Plan::new(args.quick, args.reps, args.seconds);
        // As invoked, options included, for the table's caption.
        let command = std::iter::once("cargo xtask".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        return mac::only(
            &agent(&args, !args.quick)?,
            &cargo::probe_bin()?,
            &plan,
            &command,
        );
    }
    if args.cni_only {
        return cni::only(&agent(&args, !args.quick)?, args.quick);
    }
    if args.churn || !args.churn_sizes.is_empty() {
        return churn_only(&args);
    }
    full(&args)
}

/// `--churn`: the churn tables on stdout, and `churn.json` / `churn.md` in the output
/// directory.
fn churn_only(args: &Args) -> Result<i32> {
    let agent = agent(args, !args.quick)?;
    let plan = churn::Plan::new(args.quick, &args.churn_sizes);
    let section = churn::run(&agent, &plan)?;
    let md = section.md.join("\n");
    println!("\n{md}");
    let out_dir = out_dir(args)?;
    let json: serde_json::Map<String, Value> = section
        .json
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    std::fs::write(
        out_dir.join("churn.json"),
        serde_json::to_vec_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join("churn.md"), &md)?;
    println!("results: {}/churn.json, churn.md", out_dir.display());
    Ok(0)
}

/// The full run (or `--quick`'s): every scenario in order, then the goals and the report.
fn full(args: &Args) -> Result<i32> {
    let started = Instant::now();
    let quick = args.quick;
    // Quick runs use the debug agent the tests already built; full runs the release build.
    let agent = agent(args, !quick)?;
    let probe = cargo::probe_bin()?;
    let plan = datapath::Plan::new(quick, args.reps, args.seconds);
    let command = format!("cargo xtask bench{}", if quick { " --quick" } else { "" });
    let sections = [
        datapath::run(&agent, &probe, &plan)?,
        mac::run(
            &agent,
            &probe,
            &mac::Plan::new(quick, args.reps, args.seconds),
            &command,
        )?,
        first_connection::run(&agent, &probe)?,
        cni::section(&agent, quick)?,
        endpoints::run(&agent, quick)?,
        auth_scale::section(&agent, quick)?,
        warmup::section(&agent, quick)?,
        handshakes::run(&agent, quick)?,
        churn::run(&agent, &churn::Plan::new(quick, &[]))?,
    ];
    let mut scenarios = serde_json::Map::new();
    let mut md = Vec::new();
    for s in sections {
        scenarios.extend(s.json.into_iter().map(|(k, v)| (k.to_owned(), v)));
        md.extend(s.md);
    }
    let scenarios = Value::Object(scenarios);
    let goals = goals(&scenarios);
    md.push(goal_table(&goals));
    md.push(format!(
        "`{command}` in {:.0} s; none throughput {:.2} Gbit/s.\n",
        started.elapsed().as_secs_f64(),
        num(&scenarios["throughput_1_stream"]["settings"]["none"]["median"]) / 1e9
    ));
    let md = md.join("\n");
    println!("\n{md}");
    let report = json!({
        "command": command,
        "reps": plan.reps,
        "seconds": plan.seconds,
        "scenarios": scenarios,
        "goals": goals.iter().map(|(g, met, m)| json!({"goal": g, "met": met, "measured": m})).collect::<Vec<_>>(),
    });
    let out_dir = out_dir(args)?;
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

/// `--out`, else `<target>/bench`; created.
fn out_dir(args: &Args) -> Result<PathBuf> {
    let out_dir = match &args.out {
        Some(d) => d.clone(),
        None => cargo::target_dir()?.join("bench"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(out_dir)
}

/// A goal: what it says, whether this run met it, and what was measured.
type Goal = (&'static str, bool, String);

/// The goals, judged on this run's results (ratios to the baselines of the same run).
fn goals(sc: &Value) -> Vec<Goal> {
    let median = |v: &Value, s: &str| num(&v[s]["median"]);
    let ratio = |v: &Value| median(v, "portcullis") / median(v, "none");
    let added = |v: &Value| median(v, "portcullis") - median(v, "none");
    let (t1, c) = (
        &sc["throughput_1_stream"]["settings"],
        &sc["connections_per_second"]["settings"],
    );
    let (p50, p99) = (&sc["rr_latency"]["p50"], &sc["rr_latency"]["p99"]);
    let first_ms = |name: &str| {
        sc["first_connection"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["setting"] == name))
            .and_then(|f| f["connect_ms"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let hs = &sc["handshakes"];
    let proofs_ratio = num(&hs["proofs_to_bare"]);
    let warm = &sc["warmup"];
    let max_cost = sc["program_cost"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|p| p["ns_per_run"].as_f64())
        .fold(f64::NAN, f64::max);
    let floor_ns = num(&sc["program_cost_floor_ns"]);
    let [mac_cps, mac_syn, mac_ack] = mac::judged(&sc["connection_macs"]);
    let big = sc["endpoint_scale"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or(Value::Null);
    let big_ms = big["agent_ms"].as_f64();
    let big_kib = big["rss_kib"].as_f64();
    vec![
        (
            "throughput ≥ 0.97 × none (1 stream)",
            ratio(t1) >= 0.97,
            format!("{:.3}", ratio(t1)),
        ),
        (
            "added latency p50 < 2 µs",
            added(p50) < 2.0,
            format!("{:+.1} µs", added(p50)),
        ),
        (
            "added latency p99 < 10 µs",
            added(p99) < 10.0,
            format!("{:+.1} µs", added(p99)),
        ),
        (
            "new connections/s ≥ 0.95 × none",
            ratio(c) >= 0.95,
            format!("{:.3}", ratio(c)),
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
            "workload proofs/s ≥ 5 × full mutual TLS handshakes/s (version 1's cost per pair)",
            proofs_ratio >= handshakes::GOAL_PROOFS_TO_BARE,
            format!(
                "{proofs_ratio:.2} × sequential ({:.0} against {:.0}/s); with {} in flight {:.2} × the handshakes in flight, {:.2} × the sequential ones",
                num(&hs["median"]["proofs_per_sec"]),
                num(&hs["median"]["bare_rustls_per_sec"]),
                hs["in_flight"],
                num(&hs["proofs_concurrent_to_bare_concurrent"]),
                num(&hs["proofs_concurrent_to_bare"]),
            ),
        ),
        (
            "proactive warm-up of 10,000 pairs between two nodes < 5 s",
            warm["pairs"] == warmup::PAIRS && num(&warm["warm_s"]) < warmup::GOAL_S,
            format!(
                "{} pairs: {:.2} s ({:.2} s from the file write)",
                warm["pairs"],
                num(&warm["warm_s"]),
                num(&warm["from_write_s"])
            ),
        ),
        (
            "connection MACs: new connections/s with `syn_mac: require` ≥ 0.95 × `off`",
            mac_cps.0,
            mac_cps.1,
        ),
        (
            "connection MACs: added cost per SYN < 150 ns (checking in pc_to_pod, signing in pc_from_pod)",
            mac_syn.0,
            mac_syn.1,
        ),
        (
            "connection MACs: established-flow packets cost the same in pc_to_pod",
            mac_ack.0,
            mac_ack.1,
        ),
        (
            "program cost < 100 ns per packet",
            max_cost < 100.0,
            format!("{max_cost:.0} ns (an empty program: {floor_ns:.0} ns)"),
        ),
        (
            "100,000 endpoints in < 1 s, RSS < 64 MiB",
            big["endpoints"] == 100_000
                && big_ms.unwrap_or(f64::MAX) < 1000.0
                && big_kib.unwrap_or(f64::MAX) < 64.0 * 1024.0,
            format!(
                "{} endpoints: {:.0} ms, {:.1} MiB",
                big["endpoints"],
                big_ms.unwrap_or(f64::NAN),
                big_kib.unwrap_or(f64::NAN) / 1024.0
            ),
        ),
    ]
}

fn goal_table(goals: &[Goal]) -> String {
    let mut t = Table::new(["goal", "met", "measured"]);
    for (goal, met, measured) in goals {
        t.row([
            (*goal).to_owned(),
            (if *met { "yes" } else { "**no**" }).to_owned(),
            measured.clone(),
        ]);
    }
    t.finish()
}

/// The scenarios `bench.json` must hold (checked by the CI smoke run).
pub const SCENARIOS: [&str; 13] = [
    "throughput_1_stream",
    "throughput_4_streams",
    "rr_latency",
    "connections_per_second",
    "connection_macs",
    "first_connection",
    "cni_add",
    "program_cost",
    "handshakes",
    "endpoint_scale",
    "auth_scale",
    "warmup",
    "churn",
];

/// Checks a `bench.json`: well-formed, every scenario present, every setting measured.
pub fn check_report(path: &Path) -> Result<()> {
    let v: Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    check_scenarios(&v["scenarios"]).with_context(|| path.display().to_string())
}

fn check_scenarios(sc: &Value) -> Result<()> {
    for s in SCENARIOS {
        if sc[s].is_null() {
            bail!("scenario `{s}` is missing");
        }
    }
    for s in [
        "throughput_1_stream",
        "throughput_4_streams",
        "connections_per_second",
    ] {
        for setting in datapath::Setting::ALL {
            if sc[s]["settings"][setting.name()]["median"]
                .as_f64()
                .is_none()
            {
                bail!("`{s}` has no result for `{}`", setting.name());
            }
        }
    }
    for m in ["cps", "to_pod_syn_ns", "to_pod_established_ns"] {
        for mode in ["off", "require"] {
            if sc["connection_macs"][m][mode]["median"].as_f64().is_none() {
                bail!("connection_macs has no `{m}` for `syn_mac: {mode}`");
            }
        }
    }
    if sc["cni_add"].as_array().is_none_or(|rows| {
        rows.len() != 2
            || rows
                .iter()
                .any(|r| r["add_with_plugin_ms"]["median"].as_f64().is_none())
    }) {
        bail!("cni_add needs its ptp and bridge rows");
    }
    if sc["first_connection"].as_array().map(Vec::len) != Some(first_connection::SETTINGS.len()) {
        bail!("first_connection needs its four settings");
    }
    for source in ["kubernetes", "file"] {
        if sc["churn"][source]
            .as_array()
            .is_none_or(|rows| rows.is_empty() || rows.iter().any(|r| r["windows"].is_null()))
        {
            bail!("churn has no measurement through the {source} source");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest report `check_report` accepts.
    fn minimal() -> Value {
        let settings: serde_json::Map<String, Value> = datapath::Setting::ALL
            .iter()
            .map(|s| (s.name().to_owned(), json!({"median": 1.0})))
            .collect();
        let mut sc: serde_json::Map<String, Value> = SCENARIOS
            .iter()
            .map(|s| ((*s).to_owned(), json!({"settings": settings})))
            .collect();
        let cni = json!({"add_with_plugin_ms": {"median": 1.0}});
        sc.insert("cni_add".into(), json!([cni, cni]));
        sc.insert(
            "first_connection".into(),
            json!(first_connection::SETTINGS.map(|s| json!({"setting": s}))),
        );
        let modes = json!({"off": {"median": 1.0}, "require": {"median": 1.0}});
        sc.insert(
            "connection_macs".into(),
            json!({"cps": modes, "to_pod_syn_ns": modes, "to_pod_established_ns": modes}),
        );
        let row = json!([{"workloads": 1000, "windows": []}]);
        sc.insert("churn".into(), json!({"kubernetes": row, "file": row}));
        json!({"scenarios": sc})
    }

    #[test]
    fn check_report_wants_every_scenario_and_both_churn_sources() {
        let ok = minimal();
        check_scenarios(&ok["scenarios"]).expect("a complete report");
        for (pointer, what) in [
            ("/scenarios/handshakes", "handshakes"),
            ("/scenarios/churn/file", "file source"),
            ("/scenarios/connection_macs/cps/require", "syn_mac: require"),
        ] {
            let mut bad = ok.clone();
            *bad.pointer_mut(pointer).expect("present") = Value::Null;
            let err = check_scenarios(&bad["scenarios"]).expect_err("incomplete");
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    /// `BENCH_JSON=path cargo test -p xtask -- --ignored`: judges a real report.
    #[test]
    #[ignore = "needs BENCH_JSON, the bench.json of a run"]
    fn the_report_named_by_bench_json_passes_check_report() {
        let path = std::env::var_os("BENCH_JSON").expect("BENCH_JSON");
        check_report(Path::new(&path)).expect("a complete report");
    }
}
