//! Churn: what one pod change costs node-1's agent with N workloads in cluster state, through
//! both sources of cluster state.
//!
//! - Kubernetes: N realistic pods on an API-only node-3, served by the wire-format API server
//!   ([`super::kube::World`]); a change re-applies one pod with a new address (a `MODIFIED`
//!   watch event).
//! - File: the same N workloads in a cluster-state JSON file; a change rewrites the file
//!   atomically with one workload's address changed. The file is kept as one serialized entry
//!   per workload, and only the changed one is serialized again, so that writing a 10 MB file
//!   costs the bench a join, not an encoding. The agent re-reads the file every 500 ms: faster
//!   changes are coalesced into one re-read.
//!
//! A change moves workload `k mod N` to an address no pod has had ([`scale_address`] past the
//! N pods'). Changes come at fixed rates, each over a window: the agent's CPU over the window
//! (the scheduler's exact per-thread run time, not clock ticks), its own time per applied batch
//! (its `cluster state applied` records, either log format), and, at 1 change/s, the time from
//! each change to its address being in the kernel's endpoint map (the pinned map, looked up by
//! syscall every 200 µs). Every wait is bounded: a rate the agent cannot sustain is reported as
//! such, not waited for.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::{
    ClusterNode, Options, Testbed,
    bpfmap::PinnedMap,
    cluster::write_atomic,
    kube_api::{Kind, realistic_pod, scale_address},
};

use super::{
    kube,
    table::{Section, Table},
    util::{Applied, applied, cpu_ns, num, percentile, rss_kib, scale_workload, spec},
};

/// The index of the first scale pod: the testbed's own two pods come first (as in
/// [`kube::World`], whose pods are `scale_pods(n, "node-3", 2)`).
const FIRST: usize = 2;
/// The node the scale workloads are on: one without an agent or interfaces (API-only).
const NODE: &str = "node-3";
/// Bound on each rate's writes, and on the wait for the agent to catch up after them.
const WINDOW_BOUND: Duration = Duration::from_secs(120);
/// Bound on one change's way into the endpoint map.
const TO_MAP_BOUND: Duration = Duration::from_secs(30);
/// How often the endpoint map is looked up while waiting for a change.
const MAP_POLL: Duration = Duration::from_micros(200);
/// The agent's default `poll_interval_ms`, at which it re-reads the cluster-state file.
const FILE_POLL_MS: u64 = 500;

/// Sizes, rates and windows.
pub struct Plan {
    pub sizes: Vec<usize>,
    pub window: Duration,
    /// Changes per second, one window each.
    pub kube_rates: Vec<u32>,
    pub file_rates: Vec<u32>,
    /// A pause between the agent being ready and the first window.
    pub settle: Duration,
}

impl Plan {
    /// The full run (`sizes` empty: 1,000, 10,000 and 100,000), or `--quick`'s (1,000 only, 5 s
    /// windows, 1 and 10 changes/s).
    pub fn new(quick: bool, sizes: &[usize]) -> Self {
        let sizes = match (sizes, quick) {
            ([], true) => vec![1_000],
            ([], false) => vec![1_000, 10_000, 100_000],
            (s, _) => s.to_vec(),
        };
        Self {
            sizes,
            window: Duration::from_secs(if quick { 5 } else { 10 }),
            kube_rates: if quick {
                vec![1, 10]
            } else {
                vec![1, 10, 20, 100]
            },
            file_rates: vec![1, 10],
            settle: Duration::from_secs(if quick { 1 } else { 2 }),
        }
    }
}

/// The `i`-th scale pod (`i` from [`FIRST`]) at `addr`: `scale_pods`' pod with another address.
fn scale_pod(i: usize, addr: IpAddr) -> Value {
    realistic_pod(
        &format!("web-{i:06}"),
        &format!("shop-{}", i % 20),
        NODE,
        &format!("web-{}", i % 100),
        &[addr],
        i,
    )
}

/// The same workload in the cluster-state file's form.
fn scale_entry(i: usize, addr: IpAddr) -> Result<String> {
    let w = scale_workload(
        &format!("web-{i:06}"),
        &format!("shop-{}", i % 20),
        &format!("web-{}", i % 100),
        NODE,
        addr,
    );
    serde_json::to_string(&w).context("serializing a workload")
}

/// The cluster-state file as its parts: everything before the workloads, and one serialized
/// entry per workload (the testbed's own first).
struct FileWorld {
    tb: Testbed,
    head: String,
    entries: Vec<String>,
    own: usize,
}

impl FileWorld {
    /// The testbed (node-1's agent only), node-3 added to cluster state with `n` workloads,
    /// and the agent started once they are in the file.
    fn up(agent: &Path, n: usize) -> Result<Self> {
        let tb = Testbed::up(
            &spec(),
            &Options {
                agent_bin: Some(agent.to_owned()),
                log_level: "info".into(),
                agent_ready_timeout: Duration::from_secs(300),
                ..Options::without_agents()
            },
        )?;
        let mut cluster = tb.cluster()?;
        cluster.nodes.push(ClusterNode {
            name: NODE.into(),
            address: "198.18.0.250:4181".parse()?,
            extra: Default::default(),
        });
        let mut entries = cluster
            .workloads
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        let own = entries.len();
        cluster.workloads.clear();
        let doc = serde_json::to_string(&cluster)?;
        let Some(head) = doc
            .strip_suffix("]}")
            .filter(|h| h.ends_with("\"workloads\":["))
        else {
            bail!("the cluster file does not end in its workloads: {doc}");
        };
        for i in FIRST..FIRST + n {
            entries.push(scale_entry(i, scale_address(i))?);
        }
        let head = head.to_owned();
        let mut world = Self {
            tb,
            head,
            entries,
            own,
        };
        world.write()?;
        world.tb.start_agent("node-1")?;
        Ok(world)
    }

    /// Joins the parts and replaces the file atomically.
    fn write(&self) -> Result<()> {
        let len = self.head.len() + self.entries.iter().map(|e| e.len() + 1).sum::<usize>() + 2;
        let mut text = String::with_capacity(len);
        text.push_str(&self.head);
        for (k, e) in self.entries.iter().enumerate() {
            if k > 0 {
                text.push(',');
            }
            text.push_str(e);
        }
        text.push_str("]}");
        write_atomic(&self.tb.info().cluster_file, text.as_bytes())
    }

    /// Moves workload `i` (from [`FIRST`]) to `addr`.
    fn change(&mut self, i: usize, addr: IpAddr) -> Result<()> {
        self.entries[self.own + i - FIRST] = scale_entry(i, addr)?;
        self.write()
    }
}

/// A cluster-state source under churn, with node-1's agent running on it.
enum Source {
    Kube(kube::World),
    File(FileWorld),
}

impl Source {
    /// Sets the source up with `n` workloads, node-1's agent started on it.
    fn up(kind: &str, agent: &Path, n: usize) -> Result<Self> {
        Ok(if kind == KUBE {
            Self::Kube(kube::start(agent, n)?.0)
        } else {
            Self::File(FileWorld::up(agent, n)?)
        })
    }

    fn tb(&self) -> &Testbed {
        match self {
            Self::Kube(w) => &w.tb,
            Self::File(w) => &w.tb,
        }
    }

    /// Moves workload `i` (from [`FIRST`]) to `addr`; returns once the source shows it (the
    /// API server holds the new object, or the new file is in place).
    fn change(&mut self, i: usize, addr: IpAddr) -> Result<()> {
        match self {
            Self::Kube(w) => {
                w.api.apply(Kind::Pod, scale_pod(i, addr));
                Ok(())
            }
            Self::File(w) => w.change(i, addr),
        }
    }

    /// Over how long the changes whose way into the map is timed are spread beyond their
    /// schedule: the file's poll interval, so that they meet every phase of the agent's poll
    /// (at exactly 1/s they would all meet the same one).
    fn phase_spread(&self) -> Duration {
        match self {
            Self::Kube(_) => Duration::ZERO,
            Self::File(_) => Duration::from_millis(FILE_POLL_MS),
        }
    }

    /// How late the agent may see a change and still be keeping up: its file poll, plus a
    /// second.
    fn slack(&self) -> Duration {
        match self {
            Self::Kube(_) => Duration::from_secs(1),
            Self::File(_) => Duration::from_millis(FILE_POLL_MS + 1000),
        }
    }
}

const KUBE: &str = "kubernetes";
const FILE: &str = "file";

/// node-1's pinned endpoint maps.
struct Maps {
    v4: PinnedMap,
    v6: PinnedMap,
}

impl Maps {
    fn open(tb: &Testbed) -> Result<Self> {
        let dir = tb.node("node-1").bpffs_dir.join("maps");
        let (v4, v6) = (
            PinnedMap::open(&dir.join("PC_EP_V4"))?,
            PinnedMap::open(&dir.join("PC_EP_V6"))?,
        );
        if v4.key_size() != 4 || v6.key_size() != 16 {
            bail!(
                "endpoint maps with {}- and {}-byte keys, not 4 and 16",
                v4.key_size(),
                v6.key_size()
            );
        }
        Ok(Self { v4, v6 })
    }

    fn has(&self, addr: IpAddr) -> Result<bool> {
        match addr {
            IpAddr::V4(a) => self.v4.contains(&a.octets()),
            IpAddr::V6(a) => self.v6.contains(&a.octets()),
        }
    }

    /// Looks `addr` up every [`MAP_POLL`] until it is there (the time since `since`) or it is
    /// `until` (`None`).
    fn wait_for(&self, addr: IpAddr, since: Instant, until: Instant) -> Result<Option<Duration>> {
        loop {
            if self.has(addr)? {
                return Ok(Some(since.elapsed()));
            }
            if Instant::now() > until {
                return Ok(None);
            }
            thread::sleep(MAP_POLL);
        }
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The agent's cgroup's CPU time (µs), a cross-check of [`cpu_ns`] that also counts threads
/// that exited.
fn cgroup_usage_us(cpu_stat: &Path) -> Option<u64> {
    std::fs::read_to_string(cpu_stat)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// What one rate's window measured.
struct Window {
    rate: u32,
    changes: usize,
    /// From the window's start to the last change written.
    write_s: f64,
    /// The window the CPU was measured over.
    seconds: f64,
    cpu_pct: f64,
    cgroup_cpu_pct: Option<f64>,
    /// From the window's start to the last change in the map; `None`: not within the bound.
    done_s: Option<f64>,
    /// From the last change written to it being in the map.
    lag_ms: Option<f64>,
    /// Each change's way into the map (the window that measures it).
    to_map_ms: Vec<f64>,
    to_map_missed: usize,
    batches: Vec<Applied>,
    /// Warnings and errors the agent logged during the window.
    problems: Vec<String>,
}

/// A source under churn and what it needs to be measured.
struct Churn {
    source: Source,
    maps: Maps,
    pid: i64,
    cpu_stat: PathBuf,
    n: usize,
    /// Changes made so far.
    next: usize,
}

impl Churn {
    /// Waits (up to 300 s) until node-1's agent has the last of the `n` workloads in its
    /// endpoint map.
    fn new(source: Source, n: usize) -> Result<Self> {
        let tb = source.tb();
        let pid = i64::from(
            tb.info()
                .agent_pid("node-1")
                .context("node-1's agent pid")?,
        );
        let maps = Maps::open(tb)?;
        let last = scale_address(FIRST + n - 1);
        let now = Instant::now();
        if maps
            .wait_for(last, now, now + Duration::from_secs(300))?
            .is_none()
        {
            bail!("node-1's agent did not program the {n} workloads within 300 s");
        }
        Ok(Self {
            maps,
            cpu_stat: tb.node("node-1").agent_cgroup.join("cpu.stat"),
            pid,
            n,
            next: 0,
            source,
        })
    }

    /// The next change: workload `k mod n` to a fresh address past every pod's.
    fn next_change(&mut self) -> (usize, IpAddr) {
        let k = self.next;
        self.next += 1;
        (FIRST + k % self.n, scale_address(FIRST + self.n + k))
    }

    /// Writes `rate` changes per second over `length` from `t0` (each waited for in the map if
    /// `to_map`, spread over the phase of a polling source's poll), then waits for the last
    /// one while the window lasts.
    fn write_changes(
        &mut self,
        rate: u32,
        length: Duration,
        to_map: bool,
        t0: Instant,
    ) -> Result<Writes> {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a count of changes"
        )]
        let count = (f64::from(rate) * length.as_secs_f64()).round() as u32;
        let interval = Duration::from_secs(1) / rate.max(1);
        let phase = if to_map {
            self.source.phase_spread()
        } else {
            Duration::ZERO
        };
        let mut w = Writes::default();
        for k in 0..count {
            // frac(k·φ): offsets spread evenly over the poll, whatever the number of changes.
            let offset = phase.mul_f64((f64::from(k) * 0.618_033_988_749_895).fract());
            sleep_until(t0 + interval * k + offset);
            if t0.elapsed() > WINDOW_BOUND {
                break;
            }
            let (i, addr) = self.next_change();
            self.source.change(i, addr)?;
            let written = Instant::now();
            w.changes += 1;
            w.last = Some((addr, written));
            w.last_seen = None;
            if to_map {
                match self.maps.wait_for(addr, written, written + TO_MAP_BOUND)? {
                    Some(d) => {
                        w.to_map_ms.push(ms(d));
                        w.last_seen = Some(d);
                    }
                    None => w.missed += 1,
                }
            }
        }
        w.write_s = t0.elapsed().as_secs_f64();
        if let (Some((addr, at)), None) = (w.last, w.last_seen) {
            let until = (t0 + length).max(Instant::now());
            w.last_seen = self.maps.wait_for(addr, at, until)?;
        }
        Ok(w)
    }

    /// One rate's window: the changes, the agent's CPU over the window, then (bounded) the
    /// wait for the agent to have applied the last change, and its log records meanwhile.
    fn window(&mut self, rate: u32, length: Duration, to_map: bool) -> Result<Window> {
        let log0 = self.source.tb().agent_log("node-1").len();
        let (cpu0, cg0) = (cpu_ns(self.pid)?, cgroup_usage_us(&self.cpu_stat));
        let t0 = Instant::now();
        let w = self.write_changes(rate, length, to_map, t0)?;
        sleep_until(t0 + length);
        let seconds = t0.elapsed().as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "CPU time")]
        let cpu_pct = 100.0 * cpu_ns(self.pid)?.saturating_sub(cpu0) as f64 / 1e9 / seconds;
        #[expect(clippy::cast_precision_loss, reason = "CPU time")]
        let cgroup_cpu_pct = cgroup_usage_us(&self.cpu_stat)
            .zip(cg0)
            .map(|(b, a)| 100.0 * b.saturating_sub(a) as f64 / 1e6 / seconds);
        let lag = match (w.last, w.last_seen) {
            (Some(_), Some(seen)) => Some(seen),
            (Some((addr, at)), None) => self.maps.wait_for(addr, at, at + WINDOW_BOUND)?,
            (None, _) => None,
        };
        let done_s = w
            .last
            .zip(lag)
            .map(|((_, at), lag)| (at + lag - t0).as_secs_f64());
        // The agent logs its record after writing the map.
        thread::sleep(Duration::from_millis(300));
        let log = self.source.tb().agent_log("node-1");
        let slice = log.get(log0..).unwrap_or("");
        Ok(Window {
            rate,
            changes: w.changes,
            write_s: w.write_s,
            seconds,
            cpu_pct,
            cgroup_cpu_pct,
            done_s,
            lag_ms: lag.map(ms),
            to_map_ms: w.to_map_ms,
            to_map_missed: w.missed,
            batches: applied(slice).collect(),
            problems: slice
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// The changes of one window, as written.
#[derive(Default)]
struct Writes {
    changes: usize,
    /// From the window's start to the last change written.
    write_s: f64,
    to_map_ms: Vec<f64>,
    missed: usize,
    /// The last change's address and when it was written.
    last: Option<(IpAddr, Instant)>,
    /// When it was in the map, after its writing, if seen yet.
    last_seen: Option<Duration>,
}

/// Milliseconds of a sample's median and 99th percentile, and its size.
fn spread(v: &[f64]) -> Value {
    json!({"median": percentile(v, 50.0), "p99": percentile(v, 99.0), "n": v.len()})
}

impl Window {
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    fn offered_per_s(&self) -> f64 {
        self.changes as f64 / self.seconds.max(self.write_s)
    }

    /// Why the rate was not sustained (empty when it was): the bench could not write that
    /// fast, or the agent was more than `slack` behind at the end, or never caught up.
    fn note(&self, slack: Duration) -> String {
        let mut why = Vec::new();
        if self.offered_per_s() < 0.9 * f64::from(self.rate) {
            why.push(format!("offered {:.0}/s", self.offered_per_s()));
        }
        match self.lag_ms {
            None => why.push(format!("not caught up in {} s", WINDOW_BOUND.as_secs())),
            Some(lag) if lag > ms(slack) => why.push(format!("behind by {:.1} s", lag / 1000.0)),
            Some(_) => {}
        }
        why.join(", ")
    }

    #[expect(clippy::cast_precision_loss, reason = "rates and milliseconds")]
    fn to_json(&self, slack: Duration) -> Value {
        let batch_ms: Vec<f64> = self
            .batches
            .iter()
            .map(|a| a.apply_us as f64 / 1000.0)
            .collect();
        let note = self.note(slack);
        json!({
            "rate": self.rate,
            "changes": self.changes,
            "seconds": self.seconds,
            "write_s": self.write_s,
            "offered_per_s": self.offered_per_s(),
            "reached_per_s": self.done_s.map(|d| self.changes as f64 / d.max(self.seconds)),
            "lag_ms": self.lag_ms,
            "sustained": note.is_empty(),
            "note": note,
            "cpu_pct": self.cpu_pct,
            "cgroup_cpu_pct": self.cgroup_cpu_pct,
            "batches": self.batches.len(),
            "changes_per_batch": self.changes as f64 / self.batches.len().max(1) as f64,
            // What the agent says it changed (the new log format only).
            "changes_logged": self.batches.iter().map(|a| a.changes).sum::<Option<u64>>(),
            "batch_ms": spread(&batch_ms),
            "change_to_map_ms": spread(&self.to_map_ms),
            "change_to_map_missed": self.to_map_missed,
            "log_problems": self.problems.len(),
        })
    }
}

/// Up to five distinct warnings or errors (their text after the level), for the report.
fn distinct_problems<'a>(lines: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for l in lines {
        let text = [" WARN ", " ERROR "]
            .iter()
            .find_map(|lvl| {
                l.split_once(lvl)
                    .map(|(_, t)| format!("{} {t}", lvl.trim()))
            })
            .unwrap_or_else(|| l.clone());
        if seen.len() < 5 && !seen.contains(&text) {
            seen.push(text);
        }
    }
    seen
}

/// One source at one size: its windows summed up for bench.json.
#[expect(clippy::cast_precision_loss, reason = "milliseconds")]
fn summarize(churn: &Churn, windows: &[Window], ready_s: f64, rss_kib: u64) -> Value {
    let batches: Vec<&Applied> = windows.iter().flat_map(|w| &w.batches).collect();
    let per_batch = |f: fn(&Applied) -> u64| -> Vec<f64> {
        batches.iter().map(|a| f(a) as f64 / 1000.0).collect()
    };
    let to_map: Vec<f64> = windows.iter().flat_map(|w| w.to_map_ms.clone()).collect();
    let slack = churn.source.slack();
    json!({
        "workloads": churn.n,
        "ready_s": ready_s,
        "rss_kib": rss_kib,
        "log_format": if batches.iter().any(|a| a.millis) { "read_ms/took_ms" } else { "decode_us/took_us" },
        "agent_ms": spread(&per_batch(|a| a.apply_us)),
        "decode_ms": spread(&per_batch(|a| a.decode_us)),
        "change_to_map_ms": spread(&to_map),
        "change_to_map_missed": windows.iter().map(|w| w.to_map_missed).sum::<usize>(),
        "windows": windows.iter().map(|w| w.to_json(slack)).collect::<Vec<_>>(),
        "log_problems": distinct_problems(windows.iter().flat_map(|w| &w.problems)),
    })
}

/// Sets one source up with `n` workloads, then runs one window per rate.
fn measure(kind: &str, agent: &Path, n: usize, rates: &[u32], plan: &Plan) -> Result<Value> {
    eprintln!("churn: {n} workloads, {kind} source…");
    let started = Instant::now();
    let mut churn = Churn::new(Source::up(kind, agent, n)?, n)?;
    let ready_s = started.elapsed().as_secs_f64();
    thread::sleep(plan.settle);
    let mut windows = Vec::new();
    for &rate in rates {
        let w = churn.window(rate, plan.window, rate == 1)?;
        eprintln!(
            "  {rate} change(s)/s: {} changes in {:.1} s, {} applied batches, agent CPU {:.1}% of a core, last change in the map {}",
            w.changes,
            w.seconds,
            w.batches.len(),
            w.cpu_pct,
            w.lag_ms
                .map_or_else(|| "never".to_owned(), |l| format!("{l:.0} ms after it")),
        );
        windows.push(w);
    }
    let rss = rss_kib(churn.pid)?;
    Ok(summarize(&churn, &windows, ready_s, rss))
}

/// A cell of two numbers, `median / p99`, or `–`.
fn pair(v: &Value) -> String {
    match (v["median"].as_f64(), v["p99"].as_f64()) {
        (Some(m), Some(p)) => format!("{m:.2} / {p:.2}"),
        _ => "–".to_owned(),
    }
}

/// The CPU cell of `rate`: percent of a core, with why the rate was not sustained.
fn cpu_cell(row: &Value, rate: u32) -> String {
    let Some(w) = row["windows"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["rate"] == rate))
    else {
        return "–".to_owned();
    };
    let note = w["note"].as_str().unwrap_or("");
    let cpu = format!("{:.1}", num(&w["cpu_pct"]));
    if note.is_empty() {
        cpu
    } else {
        format!("{cpu} (**{note}**)")
    }
}

fn table(kind: &str, rows: &[Value], rates: &[u32]) -> String {
    let file = kind == FILE;
    let mut header = vec![
        "workloads".to_owned(),
        if file {
            "agent per re-read, median / p99 (ms)".to_owned()
        } else {
            "agent per change, median / p99 (ms)".to_owned()
        },
    ];
    if file {
        header.push("decode per re-read, median (ms)".to_owned());
    }
    header.extend(
        rates
            .iter()
            .map(|r| format!("agent CPU at {r}/s (% of a core)")),
    );
    header.push("agent RSS after (MiB)".to_owned());
    header.push(if file {
        format!("change → endpoint map, median / p99 (ms, incl. the {FILE_POLL_MS} ms poll)")
    } else {
        "change → endpoint map, median / p99 (ms)".to_owned()
    });
    let mut t = Table::new(header);
    for r in rows {
        let mut cells = vec![r["workloads"].to_string(), pair(&r["agent_ms"])];
        if file {
            cells.push(format!("{:.2}", num(&r["decode_ms"]["median"])));
        }
        cells.extend(rates.iter().map(|rate| cpu_cell(r, *rate)));
        cells.push(format!("{:.1}", num(&r["rss_kib"]) / 1024.0));
        cells.push(pair(&r["change_to_map_ms"]));
        t.row(cells);
    }
    t.finish()
}

/// The paragraph above a source's table.
fn caption(kind: &str, rows: &[Value], plan: &Plan) -> String {
    let what = if kind == KUBE {
        "Churn, Kubernetes source: one realistic Pod at a time re-applied with a new address (a MODIFIED watch event)".to_owned()
    } else {
        format!(
            "Churn, file source: one workload's address changed per atomic rewrite of the cluster-state JSON; the agent re-reads it every {FILE_POLL_MS} ms, coalescing faster changes into one re-read, so agent times are per re-read"
        )
    };
    let millis = if rows.iter().any(|r| r["log_format"] == "read_ms/took_ms") {
        " (whole milliseconds in this agent's log)"
    } else {
        ""
    };
    let phase = if kind == FILE {
        ", each delayed by a part of the poll interval so that they meet every phase of it"
    } else {
        ""
    };
    format!(
        "{what}. node-1's agent, {} s per rate; agent time: its `cluster state applied` records after decoding{millis}; change → map over the 1/s changes{phase}.\n",
        plan.window.as_secs()
    )
}

/// Every size through both sources, with their tables.
pub fn run(agent: &Path, plan: &Plan) -> Result<Section> {
    let (mut kube_rows, mut file_rows) = (Vec::new(), Vec::new());
    for &n in &plan.sizes {
        kube_rows.push(measure(KUBE, agent, n, &plan.kube_rates, plan)?);
        file_rows.push(measure(FILE, agent, n, &plan.file_rates, plan)?);
    }
    let md_kube = table(KUBE, &kube_rows, &plan.kube_rates);
    let md_file = table(FILE, &file_rows, &plan.file_rates);
    Ok(Section::default()
        .md(caption(KUBE, &kube_rows, plan))
        .md(md_kube)
        .md(caption(FILE, &file_rows, plan))
        .md(md_file)
        .json(
            "churn",
            json!({
                "window_s": plan.window.as_secs_f64(),
                "file_poll_interval_ms": FILE_POLL_MS,
                "rates": {KUBE: plan.kube_rates, FILE: plan.file_rates},
                KUBE: kube_rows,
                FILE: file_rows,
            }),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbed::kube_api::scale_pods;

    #[test]
    fn a_changed_pod_is_the_scale_pod_with_another_address() {
        let i = FIRST + 7;
        let pod = scale_pods(1, NODE, i).next().expect("a pod");
        assert_eq!(scale_pod(i, scale_address(i)), pod);
        let moved = scale_pod(i, scale_address(5_000));
        assert_eq!(moved["metadata"], pod["metadata"]);
        assert_ne!(moved["status"]["podIPs"], pod["status"]["podIPs"]);
    }

    #[test]
    fn fresh_addresses_are_no_pods_and_stay_in_the_test_ranges() {
        let n = 1_000;
        let mut c = (0..3 * n).map(|k| scale_address(FIRST + n + k));
        assert!(c.all(|a| match a {
            IpAddr::V4(a) => a.octets()[..2] == [198, 19],
            IpAddr::V6(a) => a.segments()[0] == 0xfd00,
        }));
        assert!(scale_address(FIRST + n) != scale_address(FIRST + n - 1));
    }
}
