//! The issuer's configuration file, validated once at start into an [`IssuerConfig`].
//!
//! ```yaml
//! listen: 0.0.0.0:4182          # where agents connect (TLS)
//! metrics_addr: 0.0.0.0:9465    # /metrics, /healthz, /readyz; `off` for none
//! ca_dir: /etc/portcullis-issuer/ca   # ca.pem and ca.key: the only place the key lives
//! cluster_state: cluster.yaml   # or `kubernetes:` as in the agent's file
//! svid_ttl_secs: 3600           # workload SVIDs
//! node_svid_ttl_secs: 3600      # node SVIDs
//! attestor:
//!   kind: bootstrap             # or kubernetes
//!   state_dir: /var/lib/portcullis-issuer   # bootstrap: join tokens (shared by replicas)
//!   token_ttl_secs: 600
//!   # kubernetes: audience (default portcullis-issuer), service_account (ns/name)
//! audit_log: /var/log/portcullis-issuer/audit.jsonl   # optional, one JSON record per line
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use marked_yaml::Spanned;
use serde::{Deserialize, Serialize};

use crate::{
    config::{
        KubernetesFile, LogFormat, absolute_path, kube_config, log_format, log_level,
        non_empty_path, ranged,
    },
    input::{self, InputError},
    inputs::KubeConfig,
};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:4182";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9465";
pub const DEFAULT_SVID_TTL_SECS: u64 = 3600;
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 600;
pub const DEFAULT_AUDIENCE: &str = "portcullis-issuer";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "portcullis/portcullis";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Spanned<String>>,
    metrics_addr: Option<Spanned<String>>,
    ca_dir: Spanned<String>,
    cluster_state: Option<Spanned<String>>,
    kubernetes: Option<KubernetesFile>,
    svid_ttl_secs: Option<Spanned<u64>>,
    node_svid_ttl_secs: Option<Spanned<u64>>,
    attestor: AttestorFile,
    audit_log: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestorFile {
    kind: Spanned<String>,
    state_dir: Option<Spanned<String>>,
    token_ttl_secs: Option<Spanned<u64>>,
    audience: Option<Spanned<String>>,
    service_account: Option<Spanned<String>>,
}

/// How agents prove which node they run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Attestor {
    /// Single-use join tokens made by `portcullis issuer enroll`, kept in `state_dir`.
    Bootstrap {
        state_dir: PathBuf,
        token_ttl_secs: u64,
    },
    /// Projected service-account tokens, checked by TokenReview.
    Kubernetes {
        audience: String,
        /// `(namespace, name)` of the agents' service account.
        service_account: (String, String),
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct IssuerConfig {
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub ca_dir: PathBuf,
    pub cluster_state: Option<PathBuf>,
    pub kubernetes: Option<KubeConfig>,
    pub svid_ttl: Duration,
    pub node_svid_ttl: Duration,
    pub attestor: Attestor,
    pub audit_log: Option<PathBuf>,
    pub log_level: String,
    pub log_format: LogFormat,
}

fn addr(
    path: &Path,
    v: Option<&Spanned<String>>,
    field: &str,
    default: &str,
    off: bool,
) -> Result<Option<SocketAddr>, InputError> {
    match v {
        Some(v) if off && v.as_str() == "off" => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            InputError::value(
                path,
                v,
                field,
                format!(
                    "`{}` is not an address:port such as 0.0.0.0:4182",
                    v.as_str()
                ),
            )
        }),
        None => Ok(default.parse().ok()),
    }
}

impl IssuerConfig {
    pub fn load(path: &Path) -> Result<Self, InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError::file(path, format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, InputError> {
        let f: File = input::parse(path, text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let relative = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let listen = addr(path, f.listen.as_ref(), "listen", DEFAULT_LISTEN, false)?
            .ok_or_else(|| InputError::file(path, "no listen address"))?;
        let metrics_addr = addr(
            path,
            f.metrics_addr.as_ref(),
            "metrics_addr",
            DEFAULT_METRICS_ADDR,
            true,
        )?;
        let ca_dir = relative(non_empty_path(path, &f.ca_dir, "ca_dir")?);
        let cluster_state = match &f.cluster_state {
            Some(p) => Some(relative(non_empty_path(path, p, "cluster_state")?)),
            None => None,
        };
        let kubernetes = match &f.kubernetes {
            Some(k) => Some(kube_config(path, k, crate::config::DEFAULT_HANDSHAKE_PORT)?),
            None => None,
        };
        if cluster_state.is_some() == kubernetes.is_some() {
            return Err(InputError::file(
                path,
                "give exactly one source of cluster state: `cluster_state` (a file) or `kubernetes`",
            ));
        }
        let ttl = |v: Option<&Spanned<u64>>, field: &str| {
            ranged(path, v, field, 10..=30 * 86_400, DEFAULT_SVID_TTL_SECS).map(Duration::from_secs)
        };
        let svid_ttl = ttl(f.svid_ttl_secs.as_ref(), "svid_ttl_secs")?;
        let node_svid_ttl = ttl(f.node_svid_ttl_secs.as_ref(), "node_svid_ttl_secs")?;
        let a = &f.attestor;
        let only = |v: Option<&Spanned<String>>, field: &str, kind: &str| match v {
            Some(v) => Err(InputError::value(
                path,
                v,
                field,
                format!("is not a setting of the `{kind}` attestor"),
            )),
            None => Ok(()),
        };
        let attestor = match a.kind.as_str() {
            "bootstrap" => {
                only(a.audience.as_ref(), "attestor.audience", "bootstrap")?;
                only(
                    a.service_account.as_ref(),
                    "attestor.service_account",
                    "bootstrap",
                )?;
                let state_dir = a.state_dir.as_ref().ok_or_else(|| {
                    InputError::value(
                        path,
                        &a.kind,
                        "attestor.state_dir",
                        "the bootstrap attestor needs `state_dir` (where join tokens are kept)",
                    )
                })?;
                Attestor::Bootstrap {
                    state_dir: relative(non_empty_path(path, state_dir, "attestor.state_dir")?),
                    token_ttl_secs: ranged(
                        path,
                        a.token_ttl_secs.as_ref(),
                        "attestor.token_ttl_secs",
                        10..=7 * 86_400,
                        DEFAULT_TOKEN_TTL_SECS,
                    )?,
                }
            }
            "kubernetes" => {
                only(a.state_dir.as_ref(), "attestor.state_dir", "kubernetes")?;
                if let Some(v) = &a.token_ttl_secs {
                    return Err(InputError::value(
                        path,
                        v,
                        "attestor.token_ttl_secs",
                        "is not a setting of the `kubernetes` attestor",
                    ));
                }
                let audience = match &a.audience {
                    Some(v) if v.trim().is_empty() => {
                        return Err(InputError::value(
                            path,
                            v,
                            "attestor.audience",
                            "must not be empty",
                        ));
                    }
                    Some(v) => v.to_string(),
                    None => DEFAULT_AUDIENCE.to_owned(),
                };
                let sa = a
                    .service_account
                    .as_ref()
                    .map_or(DEFAULT_SERVICE_ACCOUNT, |v| v.as_str());
                let service_account = match sa.split_once('/') {
                    Some((ns, name))
                        if !ns.is_empty() && !name.is_empty() && !name.contains('/') =>
                    {
                        (ns.to_owned(), name.to_owned())
                    }
                    _ => {
                        return Err(match &a.service_account {
                            Some(v) => InputError::value(
                                path,
                                v,
                                "attestor.service_account",
                                format!("`{sa}` is not `namespace/name`"),
                            ),
                            None => InputError::file(path, "bad default service account"),
                        });
                    }
                };
                Attestor::Kubernetes {
                    audience,
                    service_account,
                }
            }
            other => {
                return Err(InputError::value(
                    path,
                    &a.kind,
                    "attestor.kind",
                    format!("`{other}` is not `bootstrap` or `kubernetes`"),
                ));
            }
        };
        if matches!(attestor, Attestor::Kubernetes { .. }) && kubernetes.is_none() {
            return Err(InputError::value(
                path,
                &a.kind,
                "attestor.kind",
                "the kubernetes attestor needs cluster state from `kubernetes`",
            ));
        }
        let audit_log = match &f.audit_log {
            Some(v) => Some(absolute_path(path, Some(v), "audit_log", "")?),
            None => None,
        };
        let log_level = log_level(path, f.log_level.as_ref())?;
        let log_format = log_format(path, f.log_format.as_ref())?;
        Ok(Self {
            listen,
            metrics_addr,
            ca_dir,
            cluster_state,
            kubernetes,
            svid_ttl,
            node_svid_ttl,
            attestor,
            audit_log,
            log_level,
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<IssuerConfig, InputError> {
        IssuerConfig::parse(Path::new("/etc/issuer/issuer.yaml"), text)
    }

    #[test]
    fn a_bootstrap_issuer_reads_its_defaults_and_relative_paths() {
        let c = parse(
            "ca_dir: ca\ncluster_state: cluster.yaml\nattestor: {kind: bootstrap, state_dir: state}\n",
        )
        .unwrap();
        assert_eq!(c.ca_dir, PathBuf::from("/etc/issuer/ca"));
        assert_eq!(c.listen.port(), 4182);
        assert_eq!(c.svid_ttl, Duration::from_secs(3600));
        assert_eq!(
            c.attestor,
            Attestor::Bootstrap {
                state_dir: PathBuf::from("/etc/issuer/state"),
                token_ttl_secs: 600
            }
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (text, field, words) in [
            (
                "ca_dir: ca\ncluster_state: c\nattestor: {kind: bootstrap}\n",
                "attestor.state_dir",
                "needs `state_dir`",
            ),
            (
                "ca_dir: ca\ncluster_state: c\nattestor: {kind: spire}\n",
                "attestor.kind",
                "`spire` is not",
            ),
            (
                "ca_dir: ca\ncluster_state: c\nattestor: {kind: kubernetes}\n",
                "attestor.kind",
                "needs cluster state from `kubernetes`",
            ),
            (
                "ca_dir: ca\ncluster_state: c\nsvid_ttl_secs: 1\nattestor: {kind: bootstrap, state_dir: s}\n",
                "svid_ttl_secs",
                "out of range",
            ),
            (
                "ca_dir: ca\ncluster_state: c\nlisten: nowhere\nattestor: {kind: bootstrap, state_dir: s}\n",
                "listen",
                "`nowhere` is not an address",
            ),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.to_string().contains(words), "{e}");
        }
    }
}
