use std::{fmt::Write as _, net::TcpStream, path::Path, process::ExitCode, time::Duration};

use serde::Serialize;

use super::{Target, status::Output};
use crate::{datapath, inputs::ClusterState};

/// Preflight checks: can this node run the agent? Each failure comes with its remedy. Exits
/// non-zero when a check fails.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    /// What to do about a warning or failure.
    remedy: Option<String>,
}

fn check(
    name: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    remedy: Option<&str>,
) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        remedy: remedy.map(str::to_owned),
    }
}

fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (6, 6) {
        check(
            "kernel",
            Verdict::Ok,
            format!("Linux {release} (TCX links need 6.6 or later)"),
            None,
        )
    } else {
        check(
            "kernel",
            Verdict::Fail,
            format!("Linux {release}: TCX links need 6.6 or later"),
            Some("run the node on a kernel 6.6 or later"),
        )
    }
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        check(
            "btf",
            Verdict::Ok,
            format!("{} present", path.display()),
            None,
        )
    } else {
        check(
            "btf",
            Verdict::Warn,
            format!("{} missing", path.display()),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        )
    }
}

fn bpffs(dir: &Path) -> Check {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    match datapath::is_bpffs(existing) {
        Ok(true) => check(
            "bpffs",
            Verdict::Ok,
            format!("{} is on bpffs", existing.display()),
            None,
        ),
        Ok(false) => check(
            "bpffs",
            Verdict::Fail,
            format!(
                "{} is not on a bpffs mount, so pins cannot survive the agent",
                existing.display()
            ),
            Some(
                "mount -t bpf bpffs /sys/fs/bpf (in Kubernetes: mount the host's /sys/fs/bpf with mountPropagation: Bidirectional)",
            ),
        ),
        Err(e) => check(
            "bpffs",
            Verdict::Fail,
            e.to_string(),
            Some("mount -t bpf bpffs /sys/fs/bpf"),
        ),
    }
}

fn cgroup2() -> Check {
    match crate::datapath::cgroup2_mount() {
        Some(p) => check(
            "cgroup_v2",
            Verdict::Ok,
            format!("mounted at {}", p.display()),
            None,
        ),
        None => check(
            "cgroup_v2",
            Verdict::Fail,
            "no cgroup2 mount",
            Some(
                "boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup/unified",
            ),
        ),
    }
}

fn capabilities() -> Check {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let needed = [
        (21, "CAP_SYS_ADMIN"),
        (12, "CAP_NET_ADMIN"),
        (39, "CAP_BPF"),
        (38, "CAP_PERFMON"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        check(
            "capabilities",
            Verdict::Ok,
            "CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON",
            None,
        )
    } else {
        check(
            "capabilities",
            Verdict::Fail,
            format!("missing {}", missing.join(", ")),
            Some("run as root (in Kubernetes: a privileged container)"),
        )
    }
}

fn embedded_programs() -> Check {
    check(
        "programs",
        Verdict::Ok,
        format!(
            "the kernel programs are embedded ({} bytes); no compiler or bpf-linker is needed at run time",
            datapath::PROGRAMS_LEN
        ),
        None,
    )
}

fn peers(target: &Target) -> Vec<Check> {
    let Some(config) = &target.config else {
        return vec![check(
            "peers",
            Verdict::Warn,
            "no --config given: peer agents not checked",
            Some("pass --config FILE"),
        )];
    };
    let Some(path) = &config.cluster_state else {
        return vec![check(
            "cluster_state",
            Verdict::Warn,
            "cluster state comes from the Kubernetes API: peers are not checked from here",
            Some("`portcullis status` shows the nodes the agent knows"),
        )];
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return vec![check(
                "cluster_state",
                Verdict::Fail,
                format!("{}: {e}", path.display()),
                Some("fix the cluster_state path"),
            )];
        }
    };
    let cluster = match ClusterState::parse(path, &text) {
        Ok(c) => c,
        Err(e) => {
            return vec![check(
                "cluster_state",
                Verdict::Fail,
                e.to_string(),
                Some("fix the file at the line and field named"),
            )];
        }
    };
    let mut out = vec![check(
        "cluster_state",
        Verdict::Ok,
        format!(
            "{} nodes, {} workloads",
            cluster.nodes.len(),
            cluster.workloads.len()
        ),
        None,
    )];
    for node in cluster.nodes.values().filter(|n| n.name != config.node) {
        let c = match TcpStream::connect_timeout(&node.address, Duration::from_secs(1)) {
            Ok(_) => check(
                "peer",
                Verdict::Ok,
                format!("{} session port {} reachable", node.name, node.address),
                None,
            ),
            Err(e) => check(
                "peer",
                Verdict::Fail,
                format!("{} session port {}: {e}", node.name, node.address),
                Some("check that its agent runs and that the port is open between nodes"),
            ),
        };
        out.push(c);
    }
    out
}

/// Where the SVIDs come from, and what that means for a compromised node.
fn identity_source(target: &Target) -> Option<Check> {
    use crate::config::IdentitySource;
    let identity = target.config.as_ref()?.identity.as_ref()?;
    Some(match &identity.source {
        IdentitySource::Ca { dir, .. } => check(
            "identity",
            Verdict::Warn,
            format!(
                "source `ca`: this node holds the CA key ({}); root on any node with it can mint any identity of the trust domain",
                dir.join(crate::identity::ca::CA_KEY).display()
            ),
            Some(
                "use identity source `issuer` (portcullis issuer holds the key; nodes get only their own workloads' SVIDs); keep `ca` for a single machine",
            ),
        ),
        IdentitySource::Files { dir } => check(
            "identity",
            Verdict::Ok,
            format!("source `files`: SVIDs read from {}", dir.display()),
            None,
        ),
        IdentitySource::Issuer { addresses, .. } => check(
            "identity",
            Verdict::Ok,
            format!(
                "source `issuer` at {}: no CA key on this node",
                addresses.join(", ")
            ),
            None,
        ),
    })
}

pub fn execute(target: &Target, args: &Args) -> anyhow::Result<ExitCode> {
    let mut checks = vec![
        kernel(),
        btf(),
        bpffs(&target.bpffs_dir),
        cgroup2(),
        capabilities(),
        embedded_programs(),
    ];
    checks.extend(identity_source(target));
    checks.extend(peers(target));
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Text => {
            let mut o = String::new();
            for c in &checks {
                let mark = match c.verdict {
                    Verdict::Ok => "ok  ",
                    Verdict::Warn => "WARN",
                    Verdict::Fail => "FAIL",
                };
                let _ = writeln!(o, "{mark} {:<13} {}", c.name, c.detail);
                if let Some(r) = &c.remedy {
                    let _ = writeln!(o, "     {:<13} remedy: {r}", "");
                }
            }
            let _ = writeln!(
                o,
                "{}",
                if failed {
                    "some checks failed"
                } else {
                    "all checks passed"
                }
            );
            print!("{o}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
