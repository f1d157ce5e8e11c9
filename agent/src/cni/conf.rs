//! What a CNI invocation brings (spec 1.0, and the versions before that a chained plugin can
//! pass through): the network configuration on stdin, the `CNI_*` environment, and the error
//! result with its codes.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{DEFAULT_STATE_DIR, valid_container_id};
use crate::config::{DEFAULT_ADMIN_SOCKET, DEFAULT_BPFFS_DIR};

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
    pub(super) fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub(super) fn details(mut self, details: impl Into<String>) -> Self {
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
    pub(super) fn prev_result(&self) -> Result<&Value, CniError> {
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

    pub(super) fn require(&self, names: &[&str]) -> Result<(), CniError> {
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

    pub(super) fn pod_arg(&self, key: &str) -> Result<String, CniError> {
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
}
