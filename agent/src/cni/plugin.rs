//! The plugin's commands: ADD, DEL, CHECK and VERSION, each from the configuration and
//! environment [`super::conf`] reads, answering on stdout with the result or an error.

use std::{
    io::{self, Read, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::conf::{CNI_VERSION, CniError, Env, NetConf, SUPPORTED_VERSIONS, Unavailable, code};
use super::{Claim, bpf, read_claim, remove_claim};
use crate::{
    admin::{self, Request, Response},
    datapath::{Hook, PinDirs, ensure_bpffs, route},
};

/// The host-side interface of the pod, from the previous result: an interface with no
/// `sandbox` that is not a bridge (the bridge plugin lists the bridge and the veth).
fn host_interface(prev: &Value) -> Result<(String, u32), CniError> {
    let ifaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_INTERFACE,
                "prevResult lists no interfaces: portcullis-cni must be chained after the plugin that creates the pod's interface",
            )
        })?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for i in ifaces {
        let sandboxed = i
            .get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        let Some(name) = i.get("name").and_then(Value::as_str) else {
            continue;
        };
        if sandboxed {
            continue;
        }
        match route::link(name) {
            Ok(Some((_, Some(kind)))) if kind == "bridge" => {
                skipped.push(format!("{name} (bridge)"))
            }
            Ok(Some((index, _))) => found.push((name.to_owned(), index)),
            Ok(None) => {
                return Err(CniError::new(
                    code::UNKNOWN_INTERFACE,
                    format!(
                        "prevResult names host interface `{name}`, which does not exist in this network namespace"
                    ),
                ));
            }
            Err(e) => {
                return Err(CniError::new(
                    code::IO_FAILURE,
                    format!("looking up interface `{name}`: {e}"),
                ));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(CniError::new(
            code::UNKNOWN_INTERFACE,
            format!(
                "prevResult names no host-side interface of the pod{}: portcullis-cni needs a veth-style CNI (ptp, bridge, Calico, Cilium…)",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (only {})", skipped.join(", "))
                }
            ),
        )),
        _ => Err(CniError::new(
            code::UNKNOWN_INTERFACE,
            format!(
                "prevResult names several host-side interfaces ({}): cannot tell which is the pod's",
                found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The pod's addresses in the previous result.
fn addresses(prev: &Value) -> Vec<IpAddr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

fn attach_error(what: String, e: &io::Error) -> CniError {
    CniError::new(code::ATTACH_FAILED, format!("{what}: {e}"))
}

/// Whether both hooks of `ifindex` hold a pinned link on that very interface.
fn links_in_place(dirs: &PinDirs, ifindex: u32) -> Result<(), String> {
    for hook in Hook::ALL {
        let pin = dirs.link(ifindex, hook);
        match bpf::pinned_tcx(&pin) {
            Ok(l) if l.ifindex == ifindex && l.hook == Some(hook) => {}
            Ok(l) => {
                return Err(format!(
                    "{} holds a link on interface {} at {:?}, not on {ifindex} at {hook}",
                    pin.display(),
                    l.ifindex,
                    l.hook
                ));
            }
            Err(e) => return Err(format!("{}: {e}", pin.display())),
        }
    }
    Ok(())
}

/// Attaches the default-deny program to both hooks of `ifindex` unless a link of this very
/// interface is pinned there already (the agent's, or an earlier ADD's); returns the pins it
/// made.
fn hold(dirs: &PinDirs, ifindex: u32) -> Result<Vec<PathBuf>, CniError> {
    ensure_bpffs(&dirs.root).map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?;
    std::fs::create_dir_all(&dirs.links)
        .map_err(|e| attach_error(format!("creating {}", dirs.links.display()), &e))?;
    let deny = bpf::load_deny()
        .map_err(|e| attach_error("loading the default-deny program".into(), &e))?;
    // Each attach (BPF_LINK_CREATE) takes 13 to 33 ms in the kernel here, measured with
    // `strace -T`, and two made at once do not overlap: most of what this plugin adds to an
    // ADD.
    let mut made = Vec::new();
    for hook in Hook::ALL {
        let pin = dirs.link(ifindex, hook);
        match hold_hook(&deny, ifindex, hook, &pin) {
            Ok(true) => made.push(pin),
            Ok(false) => {}
            Err(e) => {
                // Half a hold is no hold: what this call made goes again.
                for pin in &made {
                    if let Err(e) = std::fs::remove_file(pin) {
                        eprintln!("portcullis-cni: removing {}: {e}", pin.display());
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(made)
}

/// Pins `deny` at `hook` of `ifindex` unless a link of this very interface and hook is pinned
/// there; whether it did.
fn hold_hook(
    deny: &std::os::fd::OwnedFd,
    ifindex: u32,
    hook: Hook,
    pin: &Path,
) -> Result<bool, CniError> {
    match bpf::pinned_tcx(pin) {
        Ok(l) if l.ifindex == ifindex && l.hook == Some(hook) => return Ok(false),
        // A pin of an interface that went (its index now reused): replace it.
        Ok(_) => std::fs::remove_file(pin)
            .map_err(|e| attach_error(format!("removing {}", pin.display()), &e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(attach_error(format!("reading {}", pin.display()), &e)),
    }
    bpf::attach_first(deny, ifindex, hook, pin)
        .map_err(|e| attach_error(format!("attaching to interface {ifindex} at {hook}"), &e))?;
    Ok(true)
}

/// What the agent said about a pod, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    Enforced,
    Pending(String),
    Unreachable(String),
}

fn ask_agent(socket: &Path, request: &Request, timeout: Duration) -> Asked {
    match admin::call_with_timeout(socket, request, timeout.max(Duration::from_millis(100))) {
        Ok(Response::Enrollment { enforced: true, .. }) => Asked::Enforced,
        Ok(Response::Enrollment { detail, .. }) => Asked::Pending(detail),
        Ok(Response::Error { message }) => Asked::Unreachable(message),
        Ok(other) => Asked::Unreachable(format!("unexpected answer {other:?}")),
        Err(e) => Asked::Unreachable(e.to_string()),
    }
}

/// ADD: record the claim, hold the interface in default-deny, and ask the agent (once, waiting
/// at most `enrollTimeoutMs` for its answer) to enroll the pod. Returns the previous result,
/// passed on. The claim comes first: an agent that starts between the two must find the
/// pinned links claimed, or it would take them for leftovers and remove them.
pub fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let prev = conf.prev_result()?;
    let namespace = env.pod_arg("K8S_POD_NAMESPACE")?;
    let name = env.pod_arg("K8S_POD_NAME")?;
    let (interface, ifindex) = host_interface(prev)?;
    let dirs = PinDirs::new(&conf.bpffs_dir);
    let claim = Claim {
        container_id: env.container_id.clone(),
        namespace,
        name,
        uid: env.args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        interface,
        ifindex,
        netns: env.netns.clone(),
        addresses: addresses(prev),
        added_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    super::write_claim(&conf.state_dir, &claim).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("recording the claim in {}: {e}", conf.state_dir.display()),
        )
    })?;
    let made = match hold(&dirs, ifindex) {
        Ok(made) => made,
        Err(e) => {
            forget(conf, &claim.container_id);
            return Err(e);
        }
    };
    // The agent applies what it knows at once, so asking again would only wait for cluster
    // state, which names the pod's addresses only after ADD returns on a real cluster.
    let outcome = ask_agent(
        &conf.admin_socket,
        &Request::CniAdd {
            container_id: env.container_id.clone(),
        },
        conf.enroll_timeout,
    );
    let pod = format!("{}/{}", claim.namespace, claim.name);
    match outcome {
        Asked::Enforced => {}
        Asked::Pending(why) => eprintln!(
            "portcullis-cni: {pod} stays in default-deny until the agent enrolls it: {why}"
        ),
        Asked::Unreachable(why) => {
            if conf.agent_unavailable == Unavailable::Fail {
                // Undo what this ADD did, and only that: links pinned before stay.
                for pin in &made {
                    if let Err(e) = std::fs::remove_file(pin) {
                        eprintln!("portcullis-cni: removing {}: {e}", pin.display());
                    }
                }
                forget(conf, &claim.container_id);
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "the portcullis agent at {} cannot enroll {pod} (agentUnavailable: fail)",
                        conf.admin_socket.display()
                    ),
                )
                .details(why));
            }
            eprintln!(
                "portcullis-cni: the agent is not reachable ({why}); {pod} stays in default-deny until it is"
            );
        }
    }
    let mut result = prev.clone();
    result["cniVersion"] = Value::String(conf.cni_version.clone());
    Ok(result)
}

/// Removes a claim this ADD wrote, reporting (not failing on) an error: the ADD is failing
/// already.
fn forget(conf: &NetConf, container_id: &str) {
    if let Err(e) = remove_claim(&conf.state_dir, container_id) {
        eprintln!("portcullis-cni: removing the claim of {container_id}: {e}");
    }
}

/// DEL: forget the claim, and tell the agent. Idempotent: nothing recorded is no error. The
/// links stay to the agent, their one remover: it detaches an interface no claim holds any
/// more, and the previous plugins' DEL deletes the interface, which releases the links with
/// it. (Removing them here while the interface lives would leave it without a program.)
pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
    let removed = remove_claim(&conf.state_dir, &env.container_id).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("removing the claim in {}: {e}", conf.state_dir.display()),
        )
    })?;
    if removed
        && let Asked::Unreachable(why) = ask_agent(
            &conf.admin_socket,
            &Request::CniDel {
                container_id: env.container_id.clone(),
            },
            conf.enroll_timeout,
        )
    {
        eprintln!(
            "portcullis-cni: the agent is not reachable ({why}); it releases {}'s interface when it starts",
            env.container_id
        );
    }
    Ok(())
}

/// CHECK: the pod's interface is the one recorded, and holds both programs.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let prev = conf.prev_result()?;
    let (interface, ifindex) = host_interface(prev)?;
    let claim = read_claim(&conf.state_dir, &env.container_id)
        .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no claim for container {} in {}: ADD did not run or DEL already did",
                    env.container_id,
                    conf.state_dir.display()
                ),
            )
        })?;
    if claim.ifindex != ifindex || claim.interface != interface {
        return Err(CniError::new(
            code::NOT_ENFORCED,
            format!(
                "the pod's interface is now {interface} (index {ifindex}); ADD recorded {} (index {})",
                claim.interface, claim.ifindex
            ),
        ));
    }
    links_in_place(&PinDirs::new(&conf.bpffs_dir), ifindex).map_err(|e| {
        CniError::new(
            code::NOT_ENFORCED,
            format!("interface {interface} (index {ifindex}) lacks its programs"),
        )
        .details(e)
    })
}

/// Runs one command of a plugin invocation: what to print on stdout, or the error.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": CNI_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command.as_str() {
        "ADD" => add(&conf, env).map(Some),
        "DEL" => del(&conf, env).map(|()| None),
        "CHECK" => check(&conf, env).map(|()| None),
        "" => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set: portcullis-cni is run by a container runtime (ADD, DEL, CHECK, VERSION)",
        )),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND `{other}` is not supported (ADD, DEL, CHECK, VERSION)"),
        )),
    }
}

/// The `portcullis-cni` binary.
#[must_use]
pub fn main() -> ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    let read = io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            format!("reading the network configuration from stdin: {e}"),
        )),
    };
    let (out, status) = match outcome {
        Ok(Some(v)) => (Some(v), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(e) => (Some(e.to_json()), ExitCode::FAILURE),
    };
    if let Some(v) = out {
        let mut stdout = io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, &v);
        let _ = stdout.write_all(b"\n");
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::conf::parse_args;

    #[test]
    fn add_without_prev_result_or_pod_names_fails_with_the_right_code() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"portcullis-cni"}"#)
            .unwrap();
        let mut env = Env {
            command: "ADD".into(),
            container_id: "abc".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        };
        assert_eq!(add(&c, &env).unwrap_err().code, code::INVALID_CONFIG);
        env.container_id = "../etc".into();
        assert_eq!(add(&c, &env).unwrap_err().code, code::INVALID_ENVIRONMENT);
        env.container_id.clear();
        let e = add(&c, &env).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
        let e = run(
            &Env {
                command: "VERSION".into(),
                ..Env::default()
            },
            b"",
        )
        .unwrap()
        .unwrap();
        assert_eq!(e["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }

    #[test]
    fn the_host_interface_is_the_one_outside_the_sandbox_and_addresses_come_from_ips() {
        let prev = json!({
            "interfaces": [{"name": "lo"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "198.18.1.2/24", "interface": 1}, {"address": "fd00:18:1::2/64", "interface": 1}]
        });
        assert_eq!(host_interface(&prev).unwrap(), ("lo".into(), 1));
        assert_eq!(
            addresses(&prev),
            vec![
                "198.18.1.2".parse::<IpAddr>().unwrap(),
                "fd00:18:1::2".parse().unwrap()
            ]
        );
        let gone = json!({"interfaces": [{"name": "pcnosuchif0"}]});
        let e = host_interface(&gone).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_INTERFACE);
        assert!(e.msg.contains("pcnosuchif0"), "{}", e.msg);
        let none = json!({"interfaces": [{"name": "eth0", "sandbox": "/run/netns/p"}]});
        assert_eq!(
            host_interface(&none).unwrap_err().code,
            code::UNKNOWN_INTERFACE
        );
    }
}
