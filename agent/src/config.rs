//! The agent's configuration file, validated once at start-up into an immutable [`Config`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use marked_yaml::Spanned;
use serde::{Deserialize, Serialize};

use crate::input::{self, InputError};

/// Defaults, also documented in the README's configuration reference.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/portcullis";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 500;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: Option<Spanned<String>>,
    metrics_addr: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    cluster_state: Option<Spanned<String>>,
    kubernetes: Option<KubernetesFile>,
    policy: Option<Spanned<String>>,
    bpffs_dir: Option<Spanned<String>>,
    admin_socket: Option<Spanned<String>>,
    pod_interfaces: Option<Spanned<String>>,
    cni_state_dir: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    #[serde(default)]
    datapath_log: bool,
    poll_interval_ms: Option<Spanned<u64>>,
    identity: Option<IdentityFile>,
    #[serde(default)]
    handshake: HandshakeFile,
    #[serde(default)]
    first_connection: FirstConnectionFile,
    #[serde(default)]
    flows: FlowsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowsFile {
    udp_idle_secs: Option<Spanned<u64>>,
}

pub const DEFAULT_UDP_IDLE_SECS: u64 = 120;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KubernetesFile {
    api_server: Option<Spanned<String>>,
    trust_domain: Spanned<String>,
    policy_configmap: Option<Spanned<String>>,
    policy_resources: Option<Spanned<bool>>,
    pod_cidrs: Option<Spanned<String>>,
}

/// The handshake port when `handshake.port` is not set and cluster state comes from Kubernetes.
pub const DEFAULT_HANDSHAKE_PORT: u16 = 4181;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FirstConnectionFile {
    syn_rto_ms: Option<Spanned<u32>>,
    cgroup: Option<Spanned<String>>,
    kernel_hz: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    source: Spanned<String>,
    dir: Option<Spanned<String>>,
    trust_bundle: Spanned<String>,
    svid_ttl_secs: Option<Spanned<u64>>,
    issuer: Option<Vec<Spanned<String>>>,
    attestor: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
}

/// Where the projected service-account token is mounted (Kubernetes attestor).
pub const DEFAULT_SA_TOKEN_FILE: &str = "/var/run/secrets/portcullis/token";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandshakeFile {
    port: Option<Spanned<u16>>,
    timeout_ms: Option<Spanned<u64>>,
    max_concurrent: Option<Spanned<u32>>,
    peer_rate: Option<Spanned<u32>>,
    peer_burst: Option<Spanned<u32>>,
    proactive: Option<bool>,
    proactive_per_tick: Option<Spanned<u32>>,
}

/// Where local workloads' SVIDs come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "source")]
pub enum IdentitySource {
    /// The agent holds a CA (`ca.pem`, `ca.key` in `dir`) and mints SVIDs.
    Ca { dir: PathBuf, svid_ttl_secs: u64 },
    /// A directory per identity with `tls.crt`/`tls.key` or `svid.pem`/`svid_key.pem`.
    Files { dir: PathBuf },
    /// The issuer signs them; the agent proves its node with `attest`.
    Issuer {
        addresses: Vec<String>,
        attest: crate::creds::issuer::Attest,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub source: IdentitySource,
    pub trust_bundle: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Handshake {
    /// Listening port; `None`: the port of this node's address in cluster state.
    pub port: Option<u16>,
    #[serde(with = "millis")]
    pub timeout: Duration,
    pub max_concurrent: u32,
    /// New handshake connections per second one peer address may open, sustained.
    pub peer_rate: u32,
    /// New handshake connections one peer address may open at once after a quiet spell.
    pub peer_burst: u32,
    /// Authenticate, in the background, every pair of a local workload and an endpoint of
    /// cluster state before any connection asks, and keep those entries renewed, so that a
    /// first connection finds its entry already there.
    pub proactive: bool,
    /// At most this many proactive handshakes are started per poll interval.
    pub proactive_per_tick: u32,
}

impl Handshake {
    /// What the responder lets its peers hold.
    #[must_use]
    pub fn limits(&self) -> crate::handshake::Limits {
        crate::handshake::Limits {
            timeout: self.timeout,
            max_concurrent: self.max_concurrent,
            peer_rate: self.peer_rate,
            peer_burst: self.peer_burst,
        }
    }
}

pub const DEFAULT_PROACTIVE_PER_TICK: u32 = 1024;
pub const DEFAULT_SYN_RTO_MS: u32 = 20;

/// The sockops program for pairs that are still cold at `connect()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstConnection {
    /// Initial SYN retransmission timeout for a connection whose pair is not authenticated
    /// yet; 0: off (the kernel's 1 s).
    pub syn_rto_ms: u32,
    /// The cgroup (v2) the program attaches to: the pods' parent cgroup. `None`: the cgroup v2
    /// root, detected from the mount table.
    pub cgroup: Option<PathBuf>,
    /// The kernel's `CONFIG_HZ` (timeouts are in jiffies); `None`: measured at start.
    pub kernel_hz: Option<u32>,
}

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_SVID_TTL_SECS: u64 = 3600;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 3000;
pub const DEFAULT_MAX_CONCURRENT: u32 = 32;
pub const DEFAULT_PEER_RATE: u32 = 100;
pub const DEFAULT_PEER_BURST: u32 = 200;

/// How the agent learns a local pod's host-side interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodInterfaces {
    /// The interface `portcullis-cni` recorded on ADD; for a pod without a record (one that
    /// started before the plugin was chained, or a node without it), the interface the pod's
    /// address routes through, unless that is a bridge: right on CNIs that route a /32 to each
    /// pod's veth (Calico, `ptp`).
    Auto,
    /// Only the interface `portcullis-cni` recorded. A pod without a record is not enforced on
    /// any interface (and keeps the agent from being ready).
    Cni,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// This agent's node: the name its entry has in cluster state.
    pub node: String,
    /// The cluster-state file; relative paths are resolved against the config file's directory.
    /// Exactly one of this and `kubernetes`.
    pub cluster_state: Option<PathBuf>,
    /// Cluster state (and optionally the policy) from the Kubernetes API.
    pub kubernetes: Option<crate::inputs::KubeConfig>,
    /// The authorization policy file (see `policy.rs`), resolved like `cluster_state`;
    /// `None`: every workload enforced, any authenticated peer of the trust domain admitted.
    pub policy: Option<PathBuf>,
    /// This agent's directory in bpffs: maps under `maps/`, links under `links/`. Agents that
    /// share a kernel (the testbed) need distinct directories.
    pub bpffs_dir: PathBuf,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// How local pods' host-side interfaces are found.
    pub pod_interfaces: PodInterfaces,
    /// Where `portcullis-cni` records which pod each interface belongs to (read with
    /// `pod_interfaces: cni`).
    pub cni_state_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`, or a tracing filter directive.
    pub log_level: String,
    /// `text` (default) or `json` (one JSON object per line, for log pipelines).
    pub log_format: LogFormat,
    /// Where Prometheus metrics, `/healthz` and `/readyz` are served; `None` when `off`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Forward the kernel programs' debug log (aya-log) into the agent's log. Off by default:
    /// it is on the packet path.
    pub datapath_log: bool,
    /// How often cluster state is re-read and interfaces are re-resolved.
    #[serde(with = "millis")]
    pub poll_interval: Duration,
    /// Without it the agent enforces but never authenticates: auth entries come only from
    /// `portcullis auth allow`.
    pub identity: Option<Identity>,
    pub handshake: Handshake,
    pub first_connection: FirstConnection,
    /// UDP flows (UDP has no end of connection) with no packet for this long are cut, like any
    /// other flow; the pair's next datagram is a new connection.
    #[serde(with = "millis")]
    pub udp_idle: Duration,
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

impl Config {
    /// Reads a configuration file. `node` overrides the file's `node` field (the DaemonSet
    /// passes the node name from the downward API).
    pub fn load(path: &Path, node: Option<&str>) -> Result<Self, InputError> {
        let file = input::read::<File>(path)?;
        Self::validate(path, file, node)
    }

    /// Parses and validates config text as if read from `path` (nothing is read from disk).
    pub fn parse(path: &Path, text: &str) -> Result<Self, InputError> {
        Self::validate(path, input::parse(path, text)?, None)
    }

    fn validate(path: &Path, f: File, node_override: Option<&str>) -> Result<Self, InputError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let node = match (node_override, &f.node) {
            (Some(n), _) if !n.trim().is_empty() => n.to_owned(),
            (_, Some(n)) if n.trim().is_empty() => {
                return Err(InputError::value(path, n, "node", "must not be empty"));
            }
            (_, Some(n)) => n.to_string(),
            (_, None) => {
                return Err(InputError::file(
                    path,
                    "field `node` is missing: set it, or pass --node (env PORTCULLIS_NODE)",
                ));
            }
        };
        let metrics_addr = match &f.metrics_addr {
            None => Some(
                DEFAULT_METRICS_ADDR
                    .parse()
                    .map_err(|_| InputError::file(path, "bad default metrics address"))?,
            ),
            Some(v) if v.as_str() == "off" => None,
            Some(v) => Some(v.parse().map_err(|_| {
                InputError::value(
                    path,
                    v,
                    "metrics_addr",
                    format!(
                        "`{}` is not an address:port such as 127.0.0.1:9464, or `off`",
                        v.as_str()
                    ),
                )
            })?),
        };
        let log_format = log_format(path, f.log_format.as_ref())?;
        let cluster_state = match &f.cluster_state {
            None => None,
            Some(c) => {
                let p = non_empty_path(path, c, "cluster_state")?;
                Some(if p.is_relative() { base.join(p) } else { p })
            }
        };
        let kubernetes = match &f.kubernetes {
            None => None,
            Some(k) => Some(kube_config(
                path,
                k,
                f.handshake
                    .port
                    .as_ref()
                    .map_or(DEFAULT_HANDSHAKE_PORT, |p| **p),
            )?),
        };
        if cluster_state.is_some() == kubernetes.is_some() {
            return Err(InputError::file(
                path,
                "give exactly one source of cluster state: `cluster_state` (a file) or `kubernetes`",
            ));
        }
        if kubernetes
            .as_ref()
            .is_some_and(crate::inputs::KubeConfig::policy_from_kube)
            && f.policy.is_some()
        {
            return Err(InputError::file(
                path,
                "give the policy as a file (`policy`) or from Kubernetes (`kubernetes.policy_resources` or `kubernetes.policy_configmap`), not both",
            ));
        }
        let policy = match &f.policy {
            None => None,
            Some(p) => {
                let p = non_empty_path(path, p, "policy")?;
                Some(if p.is_relative() { base.join(p) } else { p })
            }
        };
        let bpffs_dir = absolute_path(path, f.bpffs_dir.as_ref(), "bpffs_dir", DEFAULT_BPFFS_DIR)?;
        let admin_socket = absolute_path(
            path,
            f.admin_socket.as_ref(),
            "admin_socket",
            DEFAULT_ADMIN_SOCKET,
        )?;
        let pod_interfaces = match &f.pod_interfaces {
            None => PodInterfaces::Auto,
            Some(v) if v.as_str() == "auto" => PodInterfaces::Auto,
            Some(v) if v.as_str() == "cni" => PodInterfaces::Cni,
            Some(v) => {
                return Err(InputError::value(
                    path,
                    v,
                    "pod_interfaces",
                    format!("`{}` is neither `auto` nor `cni`", v.as_str()),
                ));
            }
        };
        let cni_state_dir = absolute_path(
            path,
            f.cni_state_dir.as_ref(),
            "cni_state_dir",
            crate::cni::DEFAULT_STATE_DIR,
        )?;
        let log_level = log_level(path, f.log_level.as_ref())?;
        let poll_interval_ms = ranged(
            path,
            f.poll_interval_ms.as_ref(),
            "poll_interval_ms",
            50..=60_000,
            DEFAULT_POLL_INTERVAL_MS,
        )?;
        let identity = match &f.identity {
            None => None,
            Some(i) => {
                let dir = || -> Result<PathBuf, InputError> {
                    let Some(d) = &i.dir else {
                        return Err(InputError::value(
                            path,
                            &i.source,
                            "identity.dir",
                            format!("the `{}` source needs `dir`", i.source.as_str()),
                        ));
                    };
                    let dir = non_empty_path(path, d, "identity.dir")?;
                    Ok(if dir.is_relative() {
                        base.join(dir)
                    } else {
                        dir
                    })
                };
                let not_for = |v: Option<&Spanned<String>>, field: &str| match v {
                    Some(v) => Err(InputError::value(
                        path,
                        v,
                        field,
                        format!("is not a setting of the `{}` source", i.source.as_str()),
                    )),
                    None => Ok(()),
                };
                if i.source.as_str() != "issuer" {
                    not_for(i.attestor.as_ref(), "identity.attestor")?;
                    not_for(i.token_file.as_ref(), "identity.token_file")?;
                    if let Some(first) = i.issuer.as_ref().and_then(|v| v.first()) {
                        not_for(Some(first), "identity.issuer")?;
                    }
                }
                let bundle = non_empty_path(path, &i.trust_bundle, "identity.trust_bundle")?;
                let trust_bundle = if bundle.is_relative() {
                    base.join(bundle)
                } else {
                    bundle
                };
                let source = match i.source.as_str() {
                    "ca" => {
                        let ttl = ranged(
                            path,
                            i.svid_ttl_secs.as_ref(),
                            "identity.svid_ttl_secs",
                            10..=30 * 86_400,
                            DEFAULT_SVID_TTL_SECS,
                        )?;
                        IdentitySource::Ca {
                            dir: dir()?,
                            svid_ttl_secs: ttl,
                        }
                    }
                    "files" => {
                        if let Some(v) = &i.svid_ttl_secs {
                            return Err(InputError::value(
                                path,
                                v,
                                "identity.svid_ttl_secs",
                                "only the `ca` source mints SVIDs",
                            ));
                        }
                        IdentitySource::Files { dir: dir()? }
                    }
                    "issuer" => issuer_source(path, base, i)?,
                    other => {
                        return Err(InputError::value(
                            path,
                            &i.source,
                            "identity.source",
                            format!("`{other}` is not `issuer`, `ca` or `files`"),
                        ));
                    }
                };
                Some(Identity {
                    source,
                    trust_bundle,
                })
            }
        };
        let h = &f.handshake;
        let timeout_ms = ranged(
            path,
            h.timeout_ms.as_ref(),
            "handshake.timeout_ms",
            100..=60_000,
            DEFAULT_HANDSHAKE_TIMEOUT_MS,
        )?;
        let max_concurrent = ranged(
            path,
            h.max_concurrent.as_ref(),
            "handshake.max_concurrent",
            1..=4096,
            DEFAULT_MAX_CONCURRENT,
        )?;
        let peer_rate = ranged(
            path,
            h.peer_rate.as_ref(),
            "handshake.peer_rate",
            1..=100_000,
            DEFAULT_PEER_RATE,
        )?;
        let peer_burst = ranged(
            path,
            h.peer_burst.as_ref(),
            "handshake.peer_burst",
            1..=100_000,
            DEFAULT_PEER_BURST,
        )?;
        let proactive_per_tick = ranged(
            path,
            h.proactive_per_tick.as_ref(),
            "handshake.proactive_per_tick",
            1..=10_000,
            DEFAULT_PROACTIVE_PER_TICK,
        )?;
        let handshake = Handshake {
            port: h.port.as_ref().map(|p| **p),
            timeout: Duration::from_millis(timeout_ms),
            max_concurrent,
            peer_rate,
            peer_burst,
            proactive: h.proactive.unwrap_or(true),
            proactive_per_tick,
        };
        let fc = &f.first_connection;
        let first_connection = FirstConnection {
            syn_rto_ms: ranged(
                path,
                fc.syn_rto_ms.as_ref(),
                "first_connection.syn_rto_ms",
                0..=1000,
                DEFAULT_SYN_RTO_MS,
            )?,
            cgroup: match &fc.cgroup {
                None => None,
                Some(c) => Some(absolute_path(
                    path,
                    Some(c),
                    "first_connection.cgroup",
                    "/",
                )?),
            },
            kernel_hz: match &fc.kernel_hz {
                None => None,
                Some(hz) => Some(ranged(
                    path,
                    Some(hz),
                    "first_connection.kernel_hz",
                    24..=10_000,
                    250,
                )?),
            },
        };
        let udp_idle_secs = ranged(
            path,
            f.flows.udp_idle_secs.as_ref(),
            "flows.udp_idle_secs",
            10..=86_400,
            DEFAULT_UDP_IDLE_SECS,
        )?;
        Ok(Self {
            udp_idle: Duration::from_secs(udp_idle_secs),
            first_connection,
            identity,
            handshake,
            source: path.to_owned(),
            node,
            metrics_addr,
            log_format,
            cluster_state,
            kubernetes,
            policy,
            bpffs_dir,
            admin_socket,
            pod_interfaces,
            cni_state_dir,
            log_level,
            datapath_log: f.datapath_log,
            poll_interval: Duration::from_millis(poll_interval_ms),
        })
    }
}

/// `identity.source: issuer`: the issuer's addresses and how this node proves itself.
fn issuer_source(path: &Path, base: &Path, i: &IdentityFile) -> Result<IdentitySource, InputError> {
    if let Some(v) = &i.dir {
        return Err(InputError::value(
            path,
            v,
            "identity.dir",
            "is not a setting of the `issuer` source (its SVIDs live in memory only)",
        ));
    }
    if let Some(v) = &i.svid_ttl_secs {
        return Err(InputError::value(
            path,
            v,
            "identity.svid_ttl_secs",
            "the issuer decides how long its SVIDs live",
        ));
    }
    let addresses: Vec<String> = match &i.issuer {
        Some(list) if !list.is_empty() => {
            for a in list {
                let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(InputError::value(
                        path,
                        a,
                        "identity.issuer",
                        format!(
                            "`{}` is not host:port, such as portcullis-issuer.portcullis.svc:4182",
                            a.as_str()
                        ),
                    ));
                }
            }
            list.iter().map(|a| a.to_string()).collect()
        }
        _ => {
            return Err(InputError::value(
                path,
                &i.source,
                "identity.issuer",
                "the `issuer` source needs the issuer's addresses (a list of host:port)",
            ));
        }
    };
    let token_file = |default: Option<&str>| -> Result<PathBuf, InputError> {
        match (&i.token_file, default) {
            (Some(v), _) => {
                let p = non_empty_path(path, v, "identity.token_file")?;
                Ok(if p.is_relative() { base.join(p) } else { p })
            }
            (None, Some(d)) => Ok(PathBuf::from(d)),
            (None, None) => Err(InputError::value(
                path,
                &i.source,
                "identity.token_file",
                "the bootstrap attestor needs `token_file` (the join token from `portcullis issuer enroll`)",
            )),
        }
    };
    let attest = match i.attestor.as_ref().map(|v| (v, v.as_str())) {
        None | Some((_, "kubernetes")) => crate::creds::issuer::Attest::Kubernetes {
            token_file: token_file(Some(DEFAULT_SA_TOKEN_FILE))?,
        },
        Some((_, "bootstrap")) => crate::creds::issuer::Attest::Bootstrap {
            token_file: token_file(None)?,
        },
        Some((v, other)) => {
            return Err(InputError::value(
                path,
                v,
                "identity.attestor",
                format!("`{other}` is not `kubernetes` or `bootstrap`"),
            ));
        }
    };
    Ok(IdentitySource::Issuer { addresses, attest })
}

/// The `kubernetes` section (of the agent's or the issuer's file), validated.
pub(crate) fn kube_config(
    path: &Path,
    k: &KubernetesFile,
    handshake_port: u16,
) -> Result<crate::inputs::KubeConfig, InputError> {
    crate::identity::validate_trust_domain(&k.trust_domain).map_err(|e| {
        InputError::value(
            path,
            &k.trust_domain,
            "kubernetes.trust_domain",
            format!("`{}`: {e}", k.trust_domain.as_str()),
        )
    })?;
    let policy_configmap = match &k.policy_configmap {
        None => None,
        Some(v) => match v.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Some((ns.to_owned(), name.to_owned()))
            }
            _ => {
                return Err(InputError::value(
                    path,
                    v,
                    "kubernetes.policy_configmap",
                    format!("`{}` is not `namespace/name`", v.as_str()),
                ));
            }
        },
    };
    if let Some(url) = &k.api_server
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(InputError::value(
            path,
            url,
            "kubernetes.api_server",
            format!("`{}` is not an http:// or https:// URL", url.as_str()),
        ));
    }
    let policy_resources = k.policy_resources.as_ref().is_some_and(|v| **v);
    if policy_resources && let Some(cm) = &k.policy_configmap {
        return Err(InputError::value(
            path,
            cm,
            "kubernetes.policy_configmap",
            "the policy comes from PortcullisPolicy objects (`kubernetes.policy_resources: true`) or from a ConfigMap, not both",
        ));
    }
    let check_pod_cidrs = match k.pod_cidrs.as_ref().map(|v| (v, v.as_str())) {
        None | Some((_, "enforce")) => true,
        Some((_, "ignore")) => false,
        Some((v, other)) => {
            return Err(InputError::value(
                path,
                v,
                "kubernetes.pod_cidrs",
                format!("`{other}` is not `enforce` or `ignore`"),
            ));
        }
    };
    Ok(crate::inputs::KubeConfig {
        check_pod_cidrs,
        api_server: k.api_server.as_ref().map(|u| u.to_string()),
        trust_domain: k.trust_domain.to_string(),
        handshake_port,
        policy_configmap,
        policy_resources,
        write_policy_status: false,
    })
}

/// `log_level` (of the agent's or the issuer's file): a level or filter, `info` by default.
pub(crate) fn log_level(file: &Path, v: Option<&Spanned<String>>) -> Result<String, InputError> {
    let Some(v) = v else {
        return Ok("info".to_owned());
    };
    log_filter(v.as_str()).map_err(|e| {
        InputError::value(
            file,
            v,
            "log_level",
            format!("`{}` is not a level or filter: {e}", v.as_str()),
        )
    })?;
    Ok(v.to_string())
}

/// `log_format` (of the agent's or the issuer's file): `text` by default, or `json`.
pub(crate) fn log_format(
    file: &Path,
    v: Option<&Spanned<String>>,
) -> Result<LogFormat, InputError> {
    match v.map(|v| (v, v.as_str())) {
        None | Some((_, "text")) => Ok(LogFormat::Text),
        Some((_, "json")) => Ok(LogFormat::Json),
        Some((v, other)) => Err(InputError::value(
            file,
            v,
            "log_format",
            format!("`{other}` is not `text` or `json`"),
        )),
    }
}

/// An optional number within `range`, or its default.
pub(crate) fn ranged<T>(
    file: &Path,
    v: Option<&Spanned<T>>,
    field: &str,
    range: std::ops::RangeInclusive<T>,
    default: T,
) -> Result<T, InputError>
where
    T: Copy + PartialOrd + std::fmt::Display,
{
    match v {
        Some(v) if !range.contains(&**v) => Err(InputError::value(
            file,
            v,
            field,
            format!(
                "{} is out of range {}..={}",
                **v,
                range.start(),
                range.end()
            ),
        )),
        Some(v) => Ok(**v),
        None => Ok(default),
    }
}

/// An optional absolute path, or its default.
pub(crate) fn absolute_path(
    file: &Path,
    v: Option<&Spanned<String>>,
    field: &str,
    default: &str,
) -> Result<PathBuf, InputError> {
    let Some(v) = v else {
        return Ok(PathBuf::from(default));
    };
    let p = non_empty_path(file, v, field)?;
    if !p.is_absolute() {
        return Err(InputError::value(
            file,
            v,
            field,
            format!("`{}` must be an absolute path", v.as_str()),
        ));
    }
    Ok(p)
}

pub(crate) fn non_empty_path(
    file: &Path,
    v: &Spanned<String>,
    field: &str,
) -> Result<PathBuf, InputError> {
    if v.trim().is_empty() {
        return Err(InputError::value(file, v, field, "must not be empty"));
    }
    Ok(PathBuf::from(v.as_str()))
}

/// The log filter `spec` describes (`log_level`, `PORTCULLIS_LOG`): levels and targets, and
/// span field values matched exactly. Matching them by regular expression would let a
/// 300-byte filter take seconds to compile (found by fuzzing the config).
pub fn log_filter(
    spec: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, InputError> {
        Config::parse(Path::new("/etc/portcullis/agent.yaml"), text)
    }

    /// Found by fuzzing: this `log_level` took 12 s to compile as regular expressions.
    #[test]
    fn a_log_filter_s_field_values_are_not_regular_expressions() {
        let text = include_bytes!("../../fuzz/corpus/config/slow-log-filter");
        let e = parse(&String::from_utf8_lossy(text)).expect_err("not a valid filter");
        assert!(
            e.to_string().contains("agent.yaml:3:") && e.to_string().contains("`log_level`"),
            "{e}"
        );
        // The value is quoted with its control characters escaped.
        assert!(
            e.to_string().contains("\\u{15}") && !e.to_string().chars().any(char::is_control),
            "{e}"
        );
        // Field values are still accepted, matched exactly.
        let f = log_filter("portcullis[span{peer=a.b}]=debug").unwrap();
        assert!(f.to_string().contains("peer"));
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse("node: n1\ncluster_state: cluster.yaml\n").unwrap();
        assert_eq!(c.node, "n1");
        assert_eq!(
            c.cluster_state.as_deref(),
            Some(Path::new("/etc/portcullis/cluster.yaml"))
        );
        assert_eq!(c.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
        assert_eq!(c.admin_socket, Path::new(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.log_level, "info");
        assert!(!c.datapath_log);
        assert_eq!(
            c.poll_interval,
            Duration::from_millis(DEFAULT_POLL_INTERVAL_MS)
        );
    }

    #[test]
    fn the_issuer_source_needs_addresses_and_keeps_no_files() {
        let base = "node: n1\ncluster_state: c.yaml\nidentity:\n  source: issuer\n  trust_bundle: ca.pem\n";
        let c = parse(&format!(
            "{base}  issuer: [\"issuer.portcullis.svc:4182\", \"198.18.0.250:4182\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.identity.unwrap().source,
            IdentitySource::Issuer {
                addresses: vec![
                    "issuer.portcullis.svc:4182".into(),
                    "198.18.0.250:4182".into()
                ],
                attest: crate::creds::issuer::Attest::Kubernetes {
                    token_file: PathBuf::from(DEFAULT_SA_TOKEN_FILE)
                },
            }
        );
        for (extra, field, words) in [
            ("", "identity.issuer", "needs the issuer's addresses"),
            (
                "  issuer: [\"nowhere\"]\n",
                "identity.issuer",
                "`nowhere` is not host:port",
            ),
            (
                "  issuer: [\"a:1\"]\n  attestor: bootstrap\n",
                "identity.token_file",
                "needs `token_file`",
            ),
            (
                "  issuer: [\"a:1\"]\n  attestor: tpm\n",
                "identity.attestor",
                "`tpm` is not",
            ),
            (
                "  issuer: [\"a:1\"]\n  dir: /keys\n",
                "identity.dir",
                "memory only",
            ),
            (
                "  issuer: [\"a:1\"]\n  svid_ttl_secs: 60\n",
                "identity.svid_ttl_secs",
                "the issuer decides",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).expect_err(extra);
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.to_string().contains(words), "{e}");
        }
        let e = parse("node: n1\ncluster_state: c.yaml\nidentity:\n  source: ca\n  dir: ca\n  trust_bundle: b\n  attestor: bootstrap\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("identity.attestor"), "{e}");
    }

    #[test]
    fn bad_input_names_file_line_and_field() {
        let e = parse("node: n1\ncluster_state: c.yaml\npoll_interval_ms: 5\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("poll_interval_ms"));
        assert!(
            e.to_string().starts_with("/etc/portcullis/agent.yaml:3:"),
            "{e}"
        );
        assert!(e.message.contains("out of range"), "{e}");

        let e = parse("node: n1\ncluster_state: c.yaml\nbpffs_dir: rel/dir\n").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("bpffs_dir")));

        let e = parse("node: n1\ncluster_state: c.yaml\nlog_levl: info\n").unwrap_err();
        assert!(e.message.contains("log_levl"), "{e}");

        let e = parse("cluster_state: c.yaml\n").unwrap_err();
        assert!(e.message.contains("node"), "{e}");

        let e = parse("node: n1\ncluster_state: c.yaml\npoll_interval_ms: soon\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("poll_interval_ms"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");

        let e = parse("node: n1\ncluster_state: c.yaml\nidentity:\n  source: vault\n  dir: d\n  trust_bundle: b.pem\n").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(4), Some("identity.source")),
            "{e}"
        );
        let c = parse("node: n1\ncluster_state: c.yaml\nidentity:\n  source: ca\n  dir: ca\n  trust_bundle: ca/ca.pem\n").unwrap();
        assert_eq!(
            c.identity.unwrap().source,
            IdentitySource::Ca {
                dir: PathBuf::from("/etc/portcullis/ca"),
                svid_ttl_secs: DEFAULT_SVID_TTL_SECS
            }
        );

        let e = parse("node: [n1\n").unwrap_err();
        assert!(
            e.to_string().starts_with("/etc/portcullis/agent.yaml: "),
            "{e}"
        );
    }
}
