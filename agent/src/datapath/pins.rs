//! Every bpffs path the agent uses, and the pins' lifecycle: the directories, bpffs itself
//! (mounted when missing), the layout check of maps pinned by an earlier version, and
//! `uninstall`.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use portcullis_common::{AUTH_ALL_PORTS, AuthKey, AuthValue, Counter, Endpoint, FlowValue, map};
use serde::Serialize;

use super::{DatapathError, Hook, io_err};

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted, and where the agent mounts it if nothing is.
pub(super) const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// A failed `BPF_OBJ_PIN` at `path`.
pub(super) fn pin_err(path: &Path) -> impl FnOnce(aya::pin::PinError) -> DatapathError + '_ {
    move |e| DatapathError::Io {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

/// Makes pin directory `dir` (again, if it was removed while the agent ran) and checks that it
/// is on bpffs: a pin anywhere else would be refused, and an object unpinned dies with the
/// agent.
pub(super) fn pin_dir(dir: &Path) -> Result<(), DatapathError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    if is_bpffs(dir)? {
        Ok(())
    } else {
        Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
        })
    }
}

/// Every bpffs path the agent uses, derived from its one configured directory.
#[derive(Debug, Clone)]
pub struct PinDirs {
    pub root: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
}

impl PinDirs {
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            maps: root.join("maps"),
            links: root.join("links"),
        }
    }

    /// The sockops program's link on the pods' cgroup.
    #[must_use]
    pub fn sock_ops_link(&self) -> PathBuf {
        self.links.join("sockops")
    }

    #[must_use]
    pub fn link(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.links.join(format!("{ifindex}-{}", hook.pin_suffix()))
    }

    /// Interfaces that have pinned links, from the pins' names.
    pub fn pinned_interfaces(&self) -> Result<Vec<u32>, DatapathError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.links) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&self.links)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&self.links))?;
            let name = entry.file_name();
            if let Some(index) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|i| i.parse().ok())
                && !out.contains(&index)
            {
                out.push(index);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// Makes sure `dir` is (or will be created) on a bpffs, mounting one on `/sys/fs/bpf` when the
/// directory lies below it and nothing is mounted there yet (as on a fresh node).
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing)? {
        return Ok(());
    }
    let mount = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount) && (existing == mount || mount.starts_with(existing)) {
        fs::create_dir_all(mount).map_err(io_err(mount))?;
        mount_bpffs(mount)?;
        tracing::info!(path = BPFFS_MOUNT, "mounted bpffs");
        return Ok(());
    }
    Err(DatapathError::NotBpffs {
        path: dir.to_owned(),
    })
}

pub fn is_bpffs(path: &Path) -> Result<bool, DatapathError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(path)(io::Error::other(e)))?;
    // SAFETY: `st` is plain data the kernel fills in; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 but narrower elsewhere"
    )]
    Ok(i64::from(st.f_type) == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> Result<(), DatapathError> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(|e| {
        DatapathError::Mount {
            source: io::Error::other(e),
        }
    })?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Mount {
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What `uninstall` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Removes everything under an agent's bpffs directory: links first (detaching the
/// programs, which the kernel then unloads), then maps, then the directories. Carries on past
/// individual failures and reports the first one at the end, so a partial failure leaves as
/// little behind as possible.
pub fn uninstall(root: &Path) -> Result<Removed, DatapathError> {
    let dirs = PinDirs::new(root);
    let mut removed = Removed::default();
    let mut first_err = None;
    for (dir, count) in [
        (&dirs.links, &mut removed.links),
        (&dirs.maps, &mut removed.maps),
    ] {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_err.get_or_insert(io_err(dir)(e));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => *count += 1,
                Err(e) => {
                    first_err.get_or_insert(io_err(&path)(e));
                }
            }
        }
    }
    for dir in [&dirs.links, &dirs.maps, &dirs.root] {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_err.get_or_insert(io_err(dir)(e));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// The auth map's value before pair keys moved into it: `AuthValue` up to its `keys`.
const AUTH_VALUE_BEFORE_KEYS: usize = 88;

/// Pinned maps left by an earlier version whose layout differs cannot be adopted blindly.
/// Those holding state that is derived again by itself are replaced: the auth map and the
/// counters (they start again from zero, which a Prometheus counter reset handles). An auth
/// map of the layout before pair keys is carried over, its entries without keys (admitted by
/// address, as that version did, until they are proven again), so that the flows they admitted
/// are not cut as unauthenticated; they are returned, to be written into the new map. For the
/// other maps the agent says plainly what to do rather than fail in the verifier.
pub(super) fn check_pinned_layouts(
    maps: &Path,
) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
    let value_size: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::value_size;
    let key_size: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::key_size;
    let entries: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::max_entries;
    let expected = [
        (
            map::AUTH,
            "the value size",
            size_of::<AuthValue>() as u32,
            value_size,
            true,
        ),
        (
            map::FLOWS,
            "the value size",
            size_of::<FlowValue>() as u32,
            value_size,
            false,
        ),
        (
            map::ENDPOINTS_V4,
            "the value size",
            size_of::<Endpoint>() as u32,
            value_size,
            false,
        ),
        (
            map::COUNTERS,
            "the number of counters",
            Counter::COUNT,
            entries,
            true,
        ),
        // Endpoints were an LPM trie (key: prefix length + address) before they were a hash.
        (map::ENDPOINTS_V4, "the key size", 4, key_size, false),
    ];
    let mut carried = Vec::new();
    for (name, what, want, read, replaceable) in expected {
        let path = maps.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::Map {
            name: "pinned map",
            source,
        })?;
        let found = read(&info);
        if found == want {
            continue;
        }
        if !replaceable {
            return Err(DatapathError::Incompatible {
                path,
                what,
                found,
                want,
            });
        }
        if name == map::AUTH && found as usize == AUTH_VALUE_BEFORE_KEYS {
            carried = entries_before_keys(&path)?;
        }
        // The programs still attached keep the old map until theirs are replaced; the
        // loader creates and pins the new one.
        fs::remove_file(&path).map_err(io_err(&path))?;
        tracing::warn!(
            map = name,
            what,
            found,
            want,
            carried_over = carried.len(),
            "a pinned map of an earlier layout was replaced"
        );
    }
    Ok(carried)
}

/// The entries of an auth map of the layout before pair keys, as unkeyed entries.
fn entries_before_keys(path: &Path) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
    let map_err = |source| DatapathError::Map {
        name: map::AUTH,
        source,
    };
    let data = aya::maps::MapData::from_pin(path).map_err(map_err)?;
    let old: aya::maps::HashMap<_, AuthKey, [u8; AUTH_VALUE_BEFORE_KEYS]> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
    let mut out = Vec::new();
    for entry in old.iter() {
        let (k, bytes) = entry.map_err(map_err)?;
        let mut v = AuthValue::default();
        // SAFETY: `AuthValue` is `repr(C)` plain data whose first `AUTH_VALUE_BEFORE_KEYS`
        // bytes are the old layout, field for field; every bit pattern is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                std::ptr::from_mut(&mut v).cast::<u8>(),
                AUTH_VALUE_BEFORE_KEYS,
            );
        }
        // The only flag of that layout.
        v.flags &= AUTH_ALL_PORTS;
        out.push((k, v));
    }
    Ok(out)
}
