//! cgroup v2: finding the unified hierarchy, and creating, emptying and removing subtrees.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The mount point of the cgroup2 hierarchy, from /proc/self/mountinfo. It is /sys/fs/cgroup on
/// a pure-v2 machine but e.g. /sys/fs/cgroup/unified on a hybrid one, so it is never assumed.
pub fn mount_point() -> Result<PathBuf> {
    static CACHE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let text = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
            find_cgroup2(&text).ok_or_else(|| "no cgroup2 filesystem is mounted".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Parses mountinfo text: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL…] - FSTYPE SRC SUPER`.
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mnt = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mnt)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a filesystem of type `fstype` is mounted exactly at `path`.
pub fn is_mounted(path: &Path, fstype: &str) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    text.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        right.split_whitespace().next() == Some(fstype)
            && left
                .split_whitespace()
                .nth(4)
                .map(unescape_mountinfo)
                .as_deref()
                == Some(&*path.to_string_lossy())
    })
}

pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create cgroup {}", path.display()))
}

/// Opens `<cgroup>/cgroup.procs` for writing; a child writes "0" to it between fork and exec to
/// move itself in, so that nothing it forks later can escape the cgroup.
pub fn open_procs(path: &Path) -> Result<File> {
    let p = path.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))
}

/// Whether any process lives in the subtree (`populated 1` in cgroup.events).
pub fn is_populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Every pid in the subtree.
pub fn pids(path: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    walk(path, 0, &mut |dir| {
        if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    });
    out
}

/// SIGKILLs every process in the subtree (`cgroup.kill`, which also catches processes forked
/// while it runs) and waits, bounded, until the subtree is empty.
pub fn kill_all(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let killfile = path.join("cgroup.kill");
    if killfile.exists() {
        std::fs::write(&killfile, "1")
            .with_context(|| format!("cannot write {}", killfile.display()))?;
    } else {
        // Kernels before 5.14 have no cgroup.kill: signal the pids one by one.
        for pid in pids(path) {
            // SAFETY: kill(2) with a pid read from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + timeout;
    while is_populated(path) {
        if Instant::now() > deadline {
            bail!(
                "cgroup {} still has processes {:?} after SIGKILL",
                path.display(),
                pids(path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Removes a cgroup subtree, leaves first (cgroupfs only allows rmdir of empty cgroups, and its
/// control files cannot be unlinked, so `remove_dir_all` does not work). A cgroup whose last
/// process has just died can report EBUSY for a moment, hence the bounded retry.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    walk(path, 0, &mut |d| dirs.push(d.to_path_buf()));
    // `walk` is pre-order, so reversing visits children before their parents.
    let mut errors = Vec::new();
    for dir in dirs.iter().rev() {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if tries < 50 && e.raw_os_error() == Some(libc::EBUSY) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    errors.push(format!("rmdir {}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(errors.join("; "))
    }
}

/// Pre-order walk of the cgroup directories under `dir` (depth-bounded: our trees are 4 deep).
fn walk(dir: &Path, depth: usize, f: &mut dyn FnMut(&Path)) {
    if depth > 16 {
        return;
    }
    f(dir);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&entry.path(), depth + 1, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("1 0 0:1 / /x\\040y rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/x y"))
        );
        assert_eq!(find_cgroup2("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }
}
