//! Starting processes inside a node's or pod's network namespace and cgroup, and stopping them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cgroup, netns};

/// Makes `cmd`, when spawned, enter network namespace `netns_name` (setns) and cgroup `cgroup`
/// between fork and exec, and optionally start a new session (`setsid`, so that a detached
/// agent survives the terminal of whoever started it).
///
/// Both files are opened here, in the parent: between fork and exec only async-signal-safe
/// calls are allowed, so the child does nothing but `setsid`, `write` and `setns` on fds it
/// already has. The fds are close-on-exec and travel inside the closure, so they live as long
/// as the `Command`. Joining the cgroup before exec means that everything the command forks
/// is in the cgroup too, and so is killed by `cgroup.kill` at teardown. Unlike `ip netns
/// exec`, nothing is remounted: the process sees the same /sys and bpffs as we do.
pub fn enter(cmd: &mut Command, netns_name: &str, cgroup: &Path, setsid: bool) -> Result<()> {
    let ns: OwnedFd = netns::open(netns_name)?;
    let procs: OwnedFd = cgroup::open_procs(cgroup)?.into();
    // SAFETY: the closure only makes raw syscalls (setsid, write, setns) on fds owned by the
    // closure; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if setsid && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" means "the writing process".
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The last `lines` lines of a log file (for error messages about a process that died).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.trim().is_empty() {
                format!("({} is empty)", path.display())
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

pub fn signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2); callers check the pid belongs to the testbed first.
    if unsafe { libc::kill(pid, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e).with_context(|| format!("kill({pid}, {sig})"));
        }
    }
    Ok(())
}

/// Waits (bounded) for a child to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waitpid")? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to a child, then waits for it; escalates to SIGKILL if it is still there after
/// `grace`.
pub fn terminate_child(child: &mut Child, sig: i32, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("waitpid")? {
        return Ok(status);
    }
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    signal(pid, sig)?;
    if let Some(status) = wait_child(child, grace)? {
        return Ok(status);
    }
    signal(pid, libc::SIGKILL)?;
    match wait_child(child, Duration::from_secs(10))? {
        Some(status) => Ok(status),
        None => bail!("process {pid} survived SIGKILL for 10 s"),
    }
}

/// For a process that is not our child (an agent started by another process): signal it and
/// wait until its /proc entry is gone or it is a zombie of someone else.
pub fn terminate_pid(pid: i32, sig: i32, grace: Duration) -> Result<()> {
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
                    .unwrap_or(true)
            })
            .unwrap_or(true)
    };
    signal(pid, sig)?;
    let mut deadline = Instant::now() + grace;
    let mut escalated = sig == libc::SIGKILL;
    loop {
        if gone(pid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            if escalated {
                bail!("process {pid} did not exit");
            }
            signal(pid, libc::SIGKILL)?;
            escalated = true;
            deadline = Instant::now() + Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
