//! The CNI protocol (spec 1.0): the command and its arguments in the environment, the network
//! configuration (with the previous plugin's result) on stdin, the result or an error as JSON
//! on stdout.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Claim, DEFAULT_STATE_DIR, bpf, read_claim, remove_claim, valid_container_id};
use crate::{
    admin::{self, Request, Response},
    config::{DEFAULT_ADMIN_SOCKET, DEFAULT_BPFFS_DIR},
    datapath::{Hook, PinDirs, ensure_bpffs, route},
};

/// The spec version of our own answers (VERSION, errors without a configuration).
pub const CNI_VERSION: &str = "1.0.0";
/// The versions of network configuration accepted: a chained plugin passes the previous
/// result on as it came, and reads only `interfaces` and `ips`, which these share. (1.1.0
/// adds the STATUS and GC verbs, which this plugin does not implement.)
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long ADD waits for the agent to enroll the pod, unless configured.
pub const DEFAULT_ENROLL_TIMEOUT_MS: u64 = 2000;

/// The spec's error codes, and ours (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The host-side interface the previous result names does not exist, or it names none.
    pub const UNKNOWN_INTERFACE: u32 = 100;
    /// The kernel refused the default-deny program or its links.
    pub const ATTACH_FAILED: u32 = 101;
    /// CHECK: the pod's interface lacks its programs.
    pub const NOT_ENFORCED: u32 = 102;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({"cniVersion": CNI_VERSION, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// What to do on ADD when the agent cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unavailable {
    /// The pod starts in default-deny and is enrolled when the agent comes (fail closed).
    DefaultDeny,
    /// ADD fails ("try again later"); the runtime retries the sandbox.
    Fail,
}

/// The keys the spec and runtimes put in any plugin's configuration: passed over, not ours.
const STANDARD_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "args",
    "ipMasq",
    "ipam",
    "dns",
    "capabilities",
    "runtimeConfig",
    "prevResult",
    "disableCheck",
    "disableGC",
];

/// Our part of the network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub bpffs_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub enroll_timeout: Duration,
    pub agent_unavailable: Unavailable,
    pub prev_result: Option<Value>,
}

fn field_error(key: &str, v: &Value, want: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("network configuration: `{key}` is {v}; it must be {want}"),
    )
}

impl NetConf {
    /// The previous plugin's result, which ADD and CHECK need.
    fn prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no prevResult: portcullis-cni is a chained plugin and must follow the plugin that creates the pod's interface",
            )
        })
    }

    /// Parses stdin's configuration.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!("network configuration on stdin is not JSON: {e}"),
            )
        })?;
        let Value::Object(map) = v else {
            return Err(CniError::new(
                code::DECODING_FAILURE,
                "network configuration on stdin is not a JSON object",
            ));
        };
        let cni_version = match map.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(field_error("cniVersion", other, "a string")),
            None => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "network configuration: `cniVersion` is missing",
                ));
            }
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "CNI version {cni_version} is not supported; portcullis-cni supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let mut conf = Self {
            cni_version,
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            enroll_timeout: Duration::from_millis(DEFAULT_ENROLL_TIMEOUT_MS),
            agent_unavailable: Unavailable::DefaultDeny,
            prev_result: None,
        };
        let path = |key: &str, v: &Value| match v {
            Value::String(s) if s.starts_with('/') => Ok(PathBuf::from(s)),
            other => Err(field_error(key, other, "an absolute path")),
        };
        for (key, v) in &map {
            match key.as_str() {
                "bpffsDir" => conf.bpffs_dir = path(key, v)?,
                "adminSocket" => conf.admin_socket = path(key, v)?,
                "stateDir" => conf.state_dir = path(key, v)?,
                "enrollTimeoutMs" => {
                    let ms = v
                        .as_u64()
                        .filter(|ms| *ms <= 60_000)
                        .ok_or_else(|| field_error(key, v, "milliseconds from 0 to 60000"))?;
                    conf.enroll_timeout = Duration::from_millis(ms);
                }
                "agentUnavailable" => {
                    conf.agent_unavailable = serde_json::from_value(v.clone())
                        .map_err(|_| field_error(key, v, "`default-deny` or `fail`"))?;
                }
                "prevResult" => conf.prev_result = Some(v.clone()),
                k if STANDARD_KEYS.contains(&k) => {}
                other => {
                    return Err(CniError::new(
                        code::UNSUPPORTED_FIELD,
                        format!(
                            "network configuration: unknown field `{other}` (value {v}); portcullis-cni knows bpffsDir, adminSocket, stateDir, enrollTimeoutMs, agentUnavailable"
                        ),
                    ));
                }
            }
        }
        Ok(conf)
    }
}

/// The environment a runtime gives a plugin.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Env {
    #[must_use]
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS")),
        }
    }

    fn require(&self, names: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| match *n {
                "CNI_CONTAINERID" => self.container_id.is_empty(),
                "CNI_NETNS" => self.netns.is_empty(),
                "CNI_IFNAME" => self.ifname.is_empty(),
                _ => false,
            })
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("missing environment variables: {}", missing.join(", ")),
            ));
        }
        if !valid_container_id(&self.container_id) {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "CNI_CONTAINERID `{}` is not a container ID (letters, digits, `-`, `_`, `.`; at most 200)",
                    self.container_id
                ),
            ));
        }
        Ok(())
    }

    fn pod_arg(&self, key: &str) -> Result<String, CniError> {
        self.args
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!(
                        "CNI_ARGS has no {key}: the runtime must name the pod (K8S_POD_NAMESPACE, K8S_POD_NAME)"
                    ),
                )
            })
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
#[must_use]
pub fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

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

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"portcullis-cni"{extra}}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn configuration_errors_carry_the_spec_codes_and_name_the_field() {
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"k8s"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("0.2.0"), "{}", e.msg);
        assert_eq!(
            NetConf::parse(b"{").unwrap_err().code,
            code::DECODING_FAILURE
        );
        let e = conf(r#","bpfsDir":"/x""#).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        assert!(
            e.msg.contains("bpfsDir") && e.msg.contains("\"/x\""),
            "{}",
            e.msg
        );
        let e = conf(r#","stateDir":"relative""#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(
            e.msg.contains("stateDir") && e.msg.contains("absolute"),
            "{}",
            e.msg
        );
        let e = conf(r#","agentUnavailable":"maybe""#).unwrap_err();
        assert!(e.msg.contains("agentUnavailable"), "{}", e.msg);
        let c = conf(
            r#","ipam":{},"runtimeConfig":{},"enrollTimeoutMs":150,"agentUnavailable":"fail""#,
        )
        .unwrap();
        assert_eq!(c.enroll_timeout, Duration::from_millis(150));
        assert_eq!(c.agent_unavailable, Unavailable::Fail);
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn add_without_prev_result_or_pod_names_fails_with_the_right_code() {
        let c = conf("").unwrap();
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
