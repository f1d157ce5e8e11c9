//! Named network namespaces (`ip netns`, i.e. bind mounts under /run/netns) and the two things
//! we do *inside* them without `ip netns exec`: sysctls and process entry.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd;

/// Where iproute2 keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates a named namespace and brings its loopback up (a fresh namespace has `lo` down, and
/// half the things one runs in a pod silently rely on it). IPv6 duplicate address detection is
/// switched off for the interfaces created in it: otherwise every new interface's link-local
/// address stays tentative for a second, and the first IPv6 packets wait for it.
pub fn add(name: &str) -> Result<()> {
    cmd::ip(["netns", "add", name])?;
    cmd::ip_in(name, ["link", "set", "lo", "up"])?;
    sysctl(
        name,
        &[
            ("net.ipv6.conf.all.accept_dad".into(), "0".into()),
            ("net.ipv6.conf.default.accept_dad".into(), "0".into()),
        ],
    )?;
    Ok(())
}

/// Deletes a named namespace. The kernel destroys it (and every veth end inside it, which takes
/// the peer end with it) once the last process inside it has gone.
pub fn del(name: &str) -> Result<()> {
    cmd::ip(["netns", "del", name]).map(drop)
}

/// Names of all named namespaces (not only ours).
pub fn list() -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(NETNS_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("cannot list {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.with_context(|| format!("cannot list {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Opens the namespace file, for `setns`. Done in the parent, before any fork: opening files
/// (and allocating the path) is not something to do between fork and exec.
pub fn open(name: &str) -> Result<OwnedFd> {
    let p = path(name);
    let f =
        File::open(&p).with_context(|| format!("cannot open network namespace {}", p.display()))?;
    Ok(OwnedFd::from(f))
}

/// Moves the calling thread into the network namespace `fd` refers to.
pub fn setns(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open fd.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets sysctls inside a namespace: `settings` are `(key, value)` with dotted keys such as
/// `net.ipv4.ip_forward`. `/proc/sys/net` shows the namespace of the task that looks at it, so
/// a short-lived thread enters the namespace and writes the files; the rest of the process
/// (and the root namespace) is untouched.
pub fn sysctl(netns: &str, settings: &[(String, String)]) -> Result<()> {
    let fd = open(netns)?;
    let settings = settings.to_vec();
    let netns_name = netns.to_string();
    let worker = std::thread::Builder::new()
        .name("netns-sysctl".into())
        .spawn(move || -> Result<()> {
            setns(&fd).with_context(|| format!("setns into {netns_name}"))?;
            for (key, value) in &settings {
                let file = Path::new("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&file, value)
                    .with_context(|| format!("sysctl {key}={value} in netns {netns_name}"))?;
            }
            Ok(())
        })
        .context("cannot spawn the sysctl thread")?;
    worker
        .join()
        .map_err(|_| anyhow!("the sysctl thread for {netns} panicked"))?
}

/// Reads one sysctl inside a namespace (used by tests to check the settings landed).
pub fn sysctl_get(netns: &str, key: &str) -> Result<String> {
    let fd = open(netns)?;
    let key = key.to_string();
    let worker = std::thread::spawn(move || -> Result<String> {
        setns(&fd)?;
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        Ok(std::fs::read_to_string(&file)
            .with_context(|| format!("read {}", file.display()))?
            .trim()
            .to_string())
    });
    worker
        .join()
        .map_err(|_| anyhow!("the sysctl thread panicked"))?
}

/// The index of interface `ifname` inside namespace `netns`.
pub fn ifindex(netns: &str, ifname: &str) -> Result<u32> {
    let fd = open(netns)?;
    let name = std::ffi::CString::new(ifname)?;
    let worker = std::thread::spawn(move || -> Result<u32> {
        setns(&fd)?;
        // SAFETY: a NUL-terminated name.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => Err(std::io::Error::last_os_error().into()),
            i => Ok(i),
        }
    });
    worker
        .join()
        .map_err(|_| anyhow!("the ifindex thread panicked"))?
        .with_context(|| format!("no interface {ifname} in {netns}"))
}

/// Checks a name is acceptable as a Linux interface name.
pub fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
        bail!("invalid interface name {name:?} (1..=15 chars, no '/', ':' or space)");
    }
    Ok(())
}
