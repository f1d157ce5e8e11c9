//! Helpers the scenarios share: the two-node testbed spec, an agent's memory and CPU time, the
//! numbers in its log lines, and small statistics.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use testbed::{NodeSpec, PodSpec, Spec};

/// The testbed of most scenarios: a client pod on node-1, a server pod on node-2.
pub fn spec() -> Spec {
    Spec {
        nodes: vec![
            NodeSpec::new("node-1", vec![PodSpec::new("client")]),
            NodeSpec::new("node-2", vec![PodSpec::new("server")]),
        ],
    }
}

/// A workload for the control-plane scenarios: no interface, one address.
pub fn scale_workload(
    name: &str,
    namespace: &str,
    service_account: &str,
    node: &str,
    address: IpAddr,
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

/// The number after `name` (such as `took_ms=`) in an agent log line. `name` must start a
/// field (at the line's start or after a character that cannot be part of a field name), so
/// that `took_us=` does not match inside `revoke_took_us=`.
pub fn log_field(line: &str, name: &str) -> Option<u64> {
    let at = line
        .match_indices(name)
        .find(|(i, _)| {
            line[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })?
        .0
        + name.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// One `cluster state applied` record of an agent's log, in either of the agent's formats:
/// - the current one, in milliseconds: `read_ms` (reading and decoding the source) and
///   `took_ms` (everything, the read included);
/// - the new one, in microseconds: `decode_us` (reading and decoding; 0 for Kubernetes),
///   `took_us` (everything after decoding) and `changes` (workloads changed in the batch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// The agent's time on the batch after decoding, µs.
    pub apply_us: u64,
    /// Reading and decoding the source, µs.
    pub decode_us: u64,
    /// Workloads changed, when the agent says (the new format).
    pub changes: Option<u64>,
    pub endpoints_set: Option<u64>,
    pub endpoints_removed: Option<u64>,
    /// From the millisecond format (so at a millisecond's resolution).
    pub millis: bool,
}

impl Applied {
    pub const MESSAGE: &str = "cluster state applied";

    /// The record on `line`, if it is one.
    pub fn parse(line: &str) -> Option<Self> {
        if !line.contains(Self::MESSAGE) {
            return None;
        }
        let (apply_us, decode_us, millis) = if let Some(took) = log_field(line, "took_us=") {
            (took, log_field(line, "decode_us=").unwrap_or(0), false)
        } else {
            let took = log_field(line, "took_ms=")?;
            let read = log_field(line, "read_ms=").unwrap_or(0);
            (took.saturating_sub(read) * 1000, read * 1000, true)
        };
        Some(Self {
            apply_us,
            decode_us,
            changes: log_field(line, "changes="),
            endpoints_set: log_field(line, "endpoints_set="),
            endpoints_removed: log_field(line, "endpoints_removed="),
            millis,
        })
    }

    /// Everything the agent spent on the batch, reading included, in ms.
    #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
    pub fn total_ms(&self) -> f64 {
        (self.apply_us + self.decode_us) as f64 / 1000.0
    }
}

/// The `cluster state applied` records in `log`.
pub fn applied(log: &str) -> impl Iterator<Item = Applied> + '_ {
    log.lines().filter_map(Applied::parse)
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: i64) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The CPU time process `pid` has used so far (user and system), in seconds, at the clock
/// tick's resolution (10 ms): enough over the seconds `endpoint_scale` measures.
pub fn cpu_seconds(pid: i64) -> Result<f64> {
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

/// The time every live thread of process `pid` has spent on a CPU, in nanoseconds: the first
/// field of each `/proc/PID/task/TID/schedstat`, which the scheduler keeps exactly (clock
/// ticks are too coarse for a few percent of a core over seconds). A thread that exits
/// between two readings takes its time with it.
pub fn cpu_ns(pid: i64) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// Median and spread of a sample.
pub fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s.get(s.len() / 2).copied().unwrap_or(f64::NAN);
    json!({"median": median, "min": s.first(), "max": s.last(), "samples": v})
}

pub fn median_of(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(f64::NAN)
}

/// The smallest and largest number of a JSON array.
pub fn minmax(v: &Value) -> (f64, f64) {
    let xs: Vec<f64> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    (
        xs.iter().copied().fold(f64::MAX, f64::min),
        xs.iter().copied().fold(f64::MIN, f64::max),
    )
}

/// The `p`-th percentile (0–100) of a sample by nearest rank; NaN for an empty one.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank in a sample"
    )]
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// A JSON number as f64 (NaN when absent), for table cells.
pub fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_found_only_at_its_start() {
        let l = "INFO x: revoke_took_us=9 took_us=12 changes=1";
        assert_eq!(log_field(l, "took_us="), Some(12));
        assert_eq!(log_field(l, "changes="), Some(1));
        assert_eq!(log_field("took_ms=5", "took_ms="), Some(5));
        assert_eq!(log_field("took_ms=x", "took_ms="), None);
    }

    #[test]
    fn both_log_formats_of_an_applied_change_are_read() {
        let old = "2026-01-01T00:00:00Z  INFO portcullis::agent: cluster state applied endpoints=100002 endpoints_set=1 endpoints_removed=1 read_ms=212 took_ms=350";
        let a = Applied::parse(old).expect("old format");
        assert_eq!(
            (a.apply_us, a.decode_us, a.millis),
            (138_000, 212_000, true)
        );
        assert_eq!((a.endpoints_set, a.changes), (Some(1), None));
        assert!((a.total_ms() - 350.0).abs() < 1e-9);
        let new = "INFO portcullis::agent: cluster state applied changes=3 decode_us=0 took_us=41";
        let b = Applied::parse(new).expect("new format");
        assert_eq!((b.apply_us, b.decode_us, b.millis), (41, 0, false));
        assert_eq!(b.changes, Some(3));
        assert_eq!(Applied::parse("cluster state loaded took_ms=1"), None);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 50.0) - 50.0).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 99.0).abs() < 1e-9);
        assert!((percentile(&[3.0], 99.0) - 3.0).abs() < 1e-9);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
