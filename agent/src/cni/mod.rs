//! `portcullis-cni`, the CNI plugin chained after the cluster's own, and what it leaves for
//! the agent.
//!
//! On ADD the plugin attaches a default-deny program to the pod's host-side interface (named
//! by the previous plugin's result) before the container runs, pinned where the agent adopts
//! its links, and records a *claim*: which pod the interface belongs to. The agent reads the
//! claims (at start, at every tick when the directory changed, and at once when the plugin
//! asks) and enrolls the pod: it swaps its own programs into the pinned links and programs
//! the pod's endpoint. A claim is the only way the agent learns a pod's interface when
//! `pod_interfaces: cni`, and the one that wins with `auto`: on a bridge it is the pod's veth,
//! never the bridge. DEL removes
//! the claim and the links.
//!
//! The claim directory is written only by the plugin; the agent only reads it.

pub mod bpf;
pub mod conf;
pub mod install;
pub mod plugin;

use std::{
    collections::BTreeMap,
    fs, io,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the plugin records claims and the agent reads them, unless configured.
pub const DEFAULT_STATE_DIR: &str = "/run/portcullis/cni";

/// A pod's host-side interface, as the plugin found it on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passed it.
    #[serde(default)]
    pub uid: String,
    /// The host-side interface.
    pub interface: String,
    pub ifindex: u32,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// The addresses the previous plugins gave the pod.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// When ADD recorded it (Unix milliseconds): of two claims for one pod, the later wins.
    pub added_unix_ms: u64,
}

/// Why a claim file could not be read (it is skipped, and reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadClaim {
    pub path: PathBuf,
    pub error: String,
}

/// Whether `id` can name a claim file: the runtime's container IDs are hex or similar; nothing
/// that could leave the directory.
#[must_use]
pub fn valid_container_id(id: &str) -> bool {
    // At most 200: the claim's temporary file name adds a few bytes, within NAME_MAX.
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn claim_path(dir: &Path, container_id: &str) -> PathBuf {
    dir.join(format!("{container_id}.json"))
}

/// Records `claim`, replacing one of the same container (written whole, then renamed: a
/// reader never sees half a claim).
pub fn write_claim(dir: &Path, claim: &Claim) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = claim_path(dir, &claim.container_id);
    let tmp = dir.join(format!(".{}.tmp", claim.container_id));
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(claim).map_err(io::Error::other)?,
    )?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, &path)
}

/// Removes the claim of `container_id`; `false` when there was none.
pub fn remove_claim(dir: &Path, container_id: &str) -> io::Result<bool> {
    match fs::remove_file(claim_path(dir, container_id)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The claim of `container_id`, if recorded.
pub fn read_claim(dir: &Path, container_id: &str) -> io::Result<Option<Claim>> {
    let path = claim_path(dir, container_id);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Claims by pod (`namespace`, `name`).
pub type ClaimsByPod = BTreeMap<(String, String), Claim>;

/// Why a claim, or the directory, cannot be trusted: a claim says which pod an interface is,
/// so only root (or the agent's own user) may have written it.
fn untrusted(meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Some(format!("owned by uid {}, not root", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Every claim in `dir` (none when it does not exist), by pod; of two claims for one pod the
/// later. Files that cannot be read or trusted are returned apart; a directory that cannot be
/// trusted is an error.
pub fn read_claims(dir: &Path) -> io::Result<(ClaimsByPod, Vec<BadClaim>)> {
    let mut claims = ClaimsByPod::new();
    let mut bad = Vec::new();
    match fs::metadata(dir) {
        Ok(meta) => {
            if let Some(why) = untrusted(&meta) {
                return Err(io::Error::other(format!("{}: {why}", dir.display())));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((claims, bad)),
        Err(e) => return Err(e),
    }
    let entries = fs::read_dir(dir)?;
    for entry in entries {
        let path = entry?.path();
        let is_claim = path.extension().is_some_and(|e| e == "json")
            && path
                .file_name()
                .is_some_and(|n| !n.as_encoded_bytes().starts_with(b"."));
        if !is_claim {
            continue;
        }
        let claim = fs::symlink_metadata(&path)
            .map_err(|e| e.to_string())
            .and_then(|m| match untrusted(&m) {
                Some(why) => Err(why),
                None if !m.is_file() => Err("not a regular file".to_owned()),
                None => Ok(()),
            })
            .and_then(|()| fs::read(&path).map_err(|e| e.to_string()))
            .and_then(|b| serde_json::from_slice::<Claim>(&b).map_err(|e| e.to_string()));
        match claim {
            Ok(c) => {
                let key = (c.namespace.clone(), c.name.clone());
                if claims
                    .get(&key)
                    .is_none_or(|old| old.added_unix_ms <= c.added_unix_ms)
                {
                    claims.insert(key, c);
                }
            }
            Err(error) => bad.push(BadClaim { path, error }),
        }
    }
    Ok((claims, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, name: &str, at: u64) -> Claim {
        Claim {
            container_id: id.into(),
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
            interface: format!("veth{id}"),
            ifindex: 7,
            netns: "/run/netns/x".into(),
            addresses: vec!["198.18.1.2".parse().unwrap()],
            added_unix_ms: at,
        }
    }

    #[test]
    fn claims_round_trip_and_the_later_of_two_for_one_pod_wins() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cni");
        assert!(
            read_claims(&d).unwrap().0.is_empty(),
            "no directory: no claims"
        );
        write_claim(&d, &claim("b", "web", 2)).unwrap();
        write_claim(&d, &claim("a", "web", 1)).unwrap();
        write_claim(&d, &claim("c", "db", 1)).unwrap();
        fs::write(d.join("broken.json"), b"{").unwrap();
        let (claims, bad) = read_claims(&d).unwrap();
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[&("default".into(), "web".into())].container_id, "b");
        assert_eq!(bad.len(), 1);
        assert!(bad[0].path.ends_with("broken.json"), "{bad:?}");
        assert_eq!(read_claim(&d, "c").unwrap(), Some(claim("c", "db", 1)));
        assert!(remove_claim(&d, "c").unwrap());
        assert!(
            !remove_claim(&d, "c").unwrap(),
            "removing twice is no error"
        );
        assert_eq!(read_claim(&d, "c").unwrap(), None);
    }

    #[test]
    fn claims_others_could_write_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cni");
        write_claim(&d, &claim("a", "web", 1)).unwrap();
        fs::set_permissions(d.join("a.json"), fs::Permissions::from_mode(0o666)).unwrap();
        let (claims, bad) = read_claims(&d).unwrap();
        assert!(claims.is_empty());
        assert!(bad[0].error.contains("writable"), "{bad:?}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = read_claims(&d).unwrap_err();
        assert!(e.to_string().contains("writable"), "{e}");
    }

    #[test]
    fn container_ids_cannot_leave_the_directory() {
        assert!(valid_container_id("3f2a9c-d_1.x"));
        for bad in ["", "../x", "a/b", ".hidden", &"a".repeat(201)] {
            assert!(!valid_container_id(bad), "{bad:?}");
        }
    }
}
