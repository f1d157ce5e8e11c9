//! Installing the plugin on a node (the DaemonSet's init container) and removing it: the
//! binary into the host's CNI binary directory, and an entry chained at the end of the
//! network configuration list the runtime uses (the first `*.conf`, `*.conflist` or `*.json`
//! in name order in the configuration directory, as containerd and CRI-O choose it). A
//! single-plugin `.conf` cannot have a plugin chained after it, and a list of a spec version
//! the plugin does not speak would fail every ADD: both are refused, never skipped.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};

use super::conf::SUPPORTED_VERSIONS;

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "portcullis-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{dir} holds no network configuration list (*.conflist): install the cluster's CNI first; portcullis-cni is chained after it"
    )]
    NoConfList { dir: PathBuf },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
    #[error(
        "{path} is the configuration the runtime uses, and it is a single plugin (no `plugins` list): nothing can be chained after it; convert it into a .conflist (its plugin as the list's one entry)"
    )]
    SinglePlugin { path: PathBuf },
    #[error(
        "{path} declares cniVersion {version}; portcullis-cni supports {supported}: every ADD would fail"
    )]
    Version {
        path: PathBuf,
        version: String,
        supported: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Our entry's settings.
#[derive(Debug, Clone)]
pub struct Entry {
    pub bpffs_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub enroll_timeout_ms: u64,
    pub agent_unavailable: String,
}

impl Entry {
    fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN,
            "bpffsDir": self.bpffs_dir,
            "adminSocket": self.admin_socket,
            "stateDir": self.state_dir,
            "enrollTimeoutMs": self.enroll_timeout_ms,
            "agentUnavailable": self.agent_unavailable,
        })
    }
}

/// Writes `bytes` to `path` whole, then renames (the runtime never reads half a file).
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.portcullis-tmp"));
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The network configuration the runtime uses: the first `*.conf`, `*.conflist` or `*.json`
/// by name.
pub fn active_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_err(conf_dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        })
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfList {
            dir: conf_dir.to_owned(),
        })
}

fn read_list(path: &Path) -> Result<Map<String, Value>, InstallError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let bad = |why: String| InstallError::Bad {
        path: path.to_owned(),
        why,
    };
    match serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))? {
        Value::Object(m) if m.get("plugins").is_some_and(Value::is_array) => Ok(m),
        Value::Object(m) if m.contains_key("type") => Err(InstallError::SinglePlugin {
            path: path.to_owned(),
        }),
        _ => Err(bad(
            "not a network configuration list (no `plugins` array)".into()
        )),
    }
}

fn plugins(list: &mut Map<String, Value>) -> &mut Vec<Value> {
    match list.get_mut("plugins") {
        Some(Value::Array(a)) => a,
        _ => unreachable!("read_list checked `plugins`"),
    }
}

fn is_ours(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// Copies the plugin binary into `bin_dir` and chains `entry` last in the active list
/// (replacing an entry of ours already there). Returns the list's path.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<PathBuf, InstallError> {
    let bytes = fs::read(binary).map_err(io_err(binary))?;
    fs::create_dir_all(bin_dir).map_err(io_err(bin_dir))?;
    write_atomically(&bin_dir.join(PLUGIN), &bytes, 0o755)?;
    let path = active_conflist(conf_dir)?;
    let mut list = read_list(&path)?;
    let version = list
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(InstallError::Version {
            path,
            version,
            supported: SUPPORTED_VERSIONS.join(", "),
        });
    }
    let chain = plugins(&mut list);
    chain.retain(|p| !is_ours(p));
    chain.push(entry.to_json());
    let text = serde_json::to_vec_pretty(&Value::Object(list)).map_err(|e| InstallError::Bad {
        path: path.clone(),
        why: e.to_string(),
    })?;
    write_atomically(&path, &text, 0o644)?;
    Ok(path)
}

/// Removes our entry from every list in `conf_dir` and the binary from `bin_dir`; returns the
/// lists changed. Nothing installed is no error.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match fs::read_dir(conf_dir) {
        Ok(e) => e
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(conf_dir)(e)),
    };
    for path in entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
    {
        let Ok(mut list) = read_list(&path) else {
            continue;
        };
        let chain = plugins(&mut list);
        let before = chain.len();
        chain.retain(|p| !is_ours(p));
        if chain.len() != before {
            let text =
                serde_json::to_vec_pretty(&Value::Object(list)).map_err(|e| InstallError::Bad {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            write_atomically(&path, &text, 0o644)?;
            changed.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN);
    match fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&bin)(e)),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            bpffs_dir: "/sys/fs/bpf/portcullis".into(),
            admin_socket: "/run/portcullis/admin.sock".into(),
            state_dir: "/run/portcullis/cni".into(),
            enroll_timeout_ms: 2000,
            agent_unavailable: "default-deny".into(),
        }
    }

    #[test]
    fn install_chains_last_in_the_first_list_once_and_uninstall_restores_it() {
        let d = tempfile::tempdir().unwrap();
        let (bin, conf) = (d.path().join("bin"), d.path().join("net.d"));
        fs::create_dir_all(&conf).unwrap();
        let plugin = d.path().join("plugin");
        fs::write(&plugin, b"#!/bin/sh\n").unwrap();
        assert!(matches!(
            install(&plugin, &bin, &conf, &entry()),
            Err(InstallError::NoConfList { .. })
        ));
        let original = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}]});
        fs::write(conf.join("10-ptp.conflist"), original.to_string()).unwrap();
        fs::write(conf.join("20-other.conflist"), original.to_string()).unwrap();
        for _ in 0..2 {
            let path = install(&plugin, &bin, &conf, &entry()).unwrap();
            assert!(path.ends_with("10-ptp.conflist"));
        }
        let list: Value =
            serde_json::from_slice(&fs::read(conf.join("10-ptp.conflist")).unwrap()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ptp", PLUGIN], "chained once, last");
        assert_eq!(list["plugins"][1]["stateDir"], "/run/portcullis/cni");
        assert_eq!(fs::read(bin.join(PLUGIN)).unwrap(), b"#!/bin/sh\n");
        let changed = uninstall(&bin, &conf).unwrap();
        assert_eq!(changed, vec![conf.join("10-ptp.conflist")]);
        let list: Value =
            serde_json::from_slice(&fs::read(conf.join("10-ptp.conflist")).unwrap()).unwrap();
        assert_eq!(list, original);
        assert!(!bin.join(PLUGIN).exists());
        assert!(
            uninstall(&bin, &conf).unwrap().is_empty(),
            "twice is no error"
        );
        // A single-plugin file first in name order, or a list of another spec version, is
        // refused, not passed over.
        let single = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ptp"});
        fs::write(conf.join("05-ptp.conf"), single.to_string()).unwrap();
        assert!(matches!(
            install(&plugin, &bin, &conf, &entry()),
            Err(InstallError::SinglePlugin { .. })
        ));
        fs::remove_file(conf.join("05-ptp.conf")).unwrap();
        let mut newer = original.clone();
        newer["cniVersion"] = json!("2.0.0");
        fs::write(conf.join("10-ptp.conflist"), newer.to_string()).unwrap();
        let e = install(&plugin, &bin, &conf, &entry()).unwrap_err();
        assert!(e.to_string().contains("2.0.0"), "{e}");
    }
}
