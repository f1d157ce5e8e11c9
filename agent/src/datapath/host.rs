//! Facts about the host the agent reads rather than assumes: where cgroup v2 is mounted and the
//! kernel's tick rate.

use std::{fs, path::PathBuf};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones. Read from the mount table, never assumed.
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The kernel's `CONFIG_HZ`, measured: the jiffies counter of `/proc/timer_list` over 100 ms,
/// rounded to the nearest value kernels are built with.
pub fn kernel_hz() -> Result<u32, String> {
    fn jiffies() -> Result<u64, String> {
        let text =
            fs::read_to_string("/proc/timer_list").map_err(|e| format!("/proc/timer_list: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())
            .ok_or_else(|| "/proc/timer_list has no `jiffies:` line".to_owned())
    }
    let (j0, t0) = (jiffies()?, std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (j1, t1) = (jiffies()?, std::time::Instant::now());
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let measured = (j1.saturating_sub(j0)) as f64 / t1.duration_since(t0).as_secs_f64();
    let nearest = [100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .unwrap_or(250);
    if (f64::from(nearest) - measured).abs() > f64::from(nearest) * 0.2 {
        return Err(format!(
            "measured {measured:.0} jiffies per second, not near 100, 250, 300 or 1000; set first_connection.kernel_hz"
        ));
    }
    Ok(nearest)
}
