//! Removing testbeds: the one a `Testbed` owns (on drop), or leftovers found by name after a
//! crash, when no `Testbed` object exists any more.
//!
//! Everything works from the id alone (names are derived from it), so a testbed that crashed
//! halfway through `up`, before testbed.json was complete, is removed as well as a finished one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::info::{self, BPFFS_ROOT, TestbedInfo};
use crate::{cgroup, netns, process};

/// Removes one testbed by id (`Some`) or every testbed on the machine (`None`): any netns named
/// `pc????-*`, cgroup `<cg2>/pc????`, `/sys/fs/bpf/pc????` and state dir
/// `/run/portcullis-testbed/pc????`. Returns the ids it removed; fails (after trying
/// everything) if anything could not be removed.
pub fn down_by_prefix(id: Option<&str>) -> Result<Vec<String>> {
    let ids = match id {
        Some(id) => vec![info::normalize_id(id)?],
        None => info::list_ids(),
    };
    let mut errors = Vec::new();
    for id in &ids {
        errors.extend(teardown_id(id).into_iter().map(|e| format!("pc{id}: {e}")));
    }
    if errors.is_empty() {
        Ok(ids)
    } else {
        bail!("teardown left things behind:\n  {}", errors.join("\n  "))
    }
}

/// Best-effort removal of everything of testbed `id`; returns what went wrong (never panics).
/// The order matters: processes first (they pin namespaces and cgroups), then cgroups, then
/// namespaces (taking the veths with them), then the files.
pub fn teardown_id(id: &str) -> Vec<String> {
    let prefix = info::prefix(id);
    let state_dir = info::state_dir(id);
    let mut errors = Vec::new();

    // Containers the image tests ran (`<prefix>-agent-<node>`, `<prefix>-issuer<k>`): a test
    // killed before its handles dropped leaves them running.
    errors.extend(remove_containers(&prefix));

    // Agents recorded in pid files. Normally they are in our cgroup and cgroup.kill below gets
    // them anyway; this catches one whose cgroup move failed. The pid is checked to still be
    // in the testbed's cgroup, so a recycled pid is never signalled.
    for pid in pid_files(&state_dir) {
        if info::pid_in_testbed(pid, &prefix)
            && let Err(e) = process::signal(pid, libc::SIGKILL)
        {
            errors.push(format!("{e:#}"));
        }
    }

    match cgroup::mount_point() {
        Ok(cg2) => {
            let root = cg2.join(&prefix);
            if let Err(e) = cgroup::kill_all(&root, Duration::from_secs(10)) {
                errors.push(format!("{e:#}"));
            }
            if let Err(e) = cgroup::remove_tree(&root) {
                errors.push(format!("{e:#}"));
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }

    // Every namespace of this id, whether or not testbed.json lists it (a crash during `up`
    // can leave one that was never recorded). Pods before nodes before the fabric is not
    // needed: deleting any end of a veth pair deletes both ends.
    let ns_prefix = format!("{prefix}-");
    match netns::list() {
        Ok(names) => {
            for name in names.iter().filter(|n| n.starts_with(&ns_prefix)) {
                if let Err(e) = netns::del(name) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }

    // bpffs permits unlink of pins and rmdir of empty dirs, so remove_dir_all works on it.
    remove_dir(&Path::new(BPFFS_ROOT).join(&prefix), &mut errors);
    remove_dir(&state_dir, &mut errors);
    errors
}

/// Tears down the testbed a `TestbedInfo` describes (same as by id; the info only adds names
/// that the id already implies).
pub fn teardown_info(info: &TestbedInfo) -> Vec<String> {
    teardown_id(&info.id)
}

fn remove_dir(dir: &Path, errors: &mut Vec<String>) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("cannot remove {}: {e}", dir.display())),
    }
}

fn pid_files(state_dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p: &PathBuf| p.extension().is_some_and(|x| x == "pid"))
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
        .collect()
}

/// What is left of testbed `id` on the machine (empty when it is fully gone); used by tests
/// to check teardown and by `xtask testbed status`.
pub fn leftovers(id: &str) -> Vec<String> {
    let prefix = info::prefix(id);
    let mut found = Vec::new();
    let ns_prefix = format!("{prefix}-");
    for name in netns::list().unwrap_or_default() {
        if name.starts_with(&ns_prefix) {
            found.push(format!("netns {name}"));
        }
    }
    let mut dirs = vec![info::state_dir(id), Path::new(BPFFS_ROOT).join(&prefix)];
    if let Ok(cg2) = cgroup::mount_point() {
        dirs.push(cg2.join(&prefix));
    }
    for dir in dirs {
        if dir.exists() {
            found.push(format!("dir {}", dir.display()));
        }
    }
    found
}

/// Removes the podman containers whose names start with `<prefix>-` (none when podman is not
/// installed).
fn remove_containers(prefix: &str) -> Vec<String> {
    let Ok(out) = crate::container::podman()
        .args(["ps", "-a", "-q", "--filter", &format!("name=^{prefix}-")])
        .output()
    else {
        return Vec::new();
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    match crate::container::podman()
        .args(["rm", "-f", "-t", "0"])
        .args(&ids)
        .output()
    {
        Ok(o) if o.status.success() => Vec::new(),
        Ok(o) => vec![format!(
            "podman rm -f {}: {}",
            ids.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )],
        Err(e) => vec![format!("podman rm: {e}")],
    }
}
