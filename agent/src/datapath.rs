//! The kernel side: loading, attaching, pinning and adopting the programs, and typed access to
//! every map. The only module that touches aya.
//!
//! Lifecycle. Maps are pinned by name under `<bpffs_dir>/maps/` and TCX links under
//! `<bpffs_dir>/links/`. Pinned links keep the programs attached after the agent exits, so
//! enforcement has no gap while it is down. A restarted agent loads its programs against the
//! same pinned maps (state survives: auth entries, flows, counters) and *replaces the program
//! inside each pinned link* with `bpf_link_update`, an atomic swap: no packet ever meets an
//! interface without a program, and no established flow is reset.

pub mod route;

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    net::IpAddr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, LinkOrder, ProgramError, SchedClassifier, SockOps, TcAttach,
        TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use portcullis_common::{
    AuthKey, AuthValue, Counter, Endpoint, FlowKey, FlowValue, NAME_MAX, Name, NameKey, map,
    program,
};
use serde::Serialize;

pub use self::route::Interface;

/// The kernel programs, built by `build.rs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));
/// Size of the embedded object (for `doctor`).
pub const PROGRAMS_LEN: usize = include_bytes!(concat!(env!("OUT_DIR"), "/portcullis")).len();

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted, and where the agent mounts it if nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not on a bpffs mount, and only {BPFFS_MOUNT} is mounted automatically; mount one with `mount -t bpf bpffs <dir>`"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs on {BPFFS_MOUNT}: {source}")]
    Mount { source: io::Error },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {}", map_detail(source))]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(
        "the pinned map {path} is from an incompatible version ({what} is {found}, this version needs {want}); run `portcullis uninstall` (it removes this node's enforcement and state) and start the agent again"
    )]
    Incompatible {
        path: PathBuf,
        what: &'static str,
        found: u32,
        want: u32,
    },
    #[error("map {name} is missing from the kernel object")]
    MissingMap { name: &'static str },
    #[error("attaching to {iface} (index {ifindex}) at {hook}: {source}")]
    Attach {
        iface: String,
        ifindex: u32,
        hook: Hook,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {name} is full ({capacity} entries)")]
    Full { name: &'static str, capacity: u32 },
    #[error("name `{name}` is {len} bytes; the limit is {NAME_MAX}")]
    NameTooLong { name: String, len: usize },
}

/// A map error with the kernel's answer: aya's own message names only the system call.
fn map_detail(e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => format!("{s}: {}", s.io_error),
        other => other.to_string(),
    }
}

impl DatapathError {
    /// Whether the kernel refused a write because the map is at capacity.
    #[must_use]
    pub fn is_full(&self) -> bool {
        match self {
            Self::Full { .. } => true,
            Self::Map {
                source: MapError::SyscallError(s),
                ..
            } => s.io_error.raw_os_error() == Some(libc::E2BIG),
            _ => false,
        }
    }
}

/// A failed `BPF_OBJ_PIN` at `path`.
fn pin_err(path: &Path) -> impl FnOnce(aya::pin::PinError) -> DatapathError + '_ {
    move |e| DatapathError::Io {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

/// Makes pin directory `dir` (again, if it was removed while the agent ran) and checks that it
/// is on bpffs: a pin anywhere else would be refused, and an object unpinned dies with the
/// agent.
fn pin_dir(dir: &Path) -> Result<(), DatapathError> {
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a program attaches on a pod's host-side interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// tc egress of the host-side interface: traffic entering the pod.
    ToPod,
    /// tc ingress of the host-side interface: traffic the pod sends.
    FromPod,
}

impl Hook {
    pub const ALL: [Self; 2] = [Self::ToPod, Self::FromPod];

    const fn program(self) -> &'static str {
        match self {
            Self::ToPod => program::TO_POD,
            Self::FromPod => program::FROM_POD,
        }
    }

    const fn attach_type(self) -> TcAttachType {
        match self {
            Self::ToPod => TcAttachType::Egress,
            Self::FromPod => TcAttachType::Ingress,
        }
    }

    const fn pin_suffix(self) -> &'static str {
        match self {
            Self::ToPod => "to_pod",
            Self::FromPod => "from_pod",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ToPod => "tc egress (to pod)",
            Self::FromPod => "tc ingress (from pod)",
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

/// How an interface got its programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attached {
    /// A pinned link existed: its program was replaced atomically.
    Adopted,
    /// A new link was created and pinned.
    New,
}

pub struct Datapath {
    dirs: PinDirs,
    ebpf: Ebpf,
    ep_v4: HashMap<MapData, [u8; 4], Endpoint>,
    ep_v6: HashMap<MapData, [u8; 16], Endpoint>,
    syn_rto: Array<MapData, u32>,
    state: PinnedView,
    /// What the auth map holds. The agent is its only writer (the programs only read it), so
    /// the copy is read from the pin once, at start, and kept in step by [`Datapath::allow_pair`]
    /// and [`Datapath::revoke_pair`]: the timer and revalidation walk memory, not one syscall
    /// pair per entry (100,000 entries took 300 ms of system time per read).
    auth: std::collections::HashMap<AuthKey, AuthValue>,
    /// A second handle on each pinned map, by name: a pin removed while the agent runs is
    /// made again from it, so that the next agent still finds the state.
    map_pins: Vec<(String, MapData)>,
}

/// Things the caller runs on its own tasks.
pub struct Channels {
    pub events: RingBuf<MapData>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Loads the programs against the pinned maps under `root` (creating them on first start).
    pub fn open(root: &Path, datapath_log: bool) -> Result<(Self, Channels), DatapathError> {
        ensure_bpffs(root)?;
        let dirs = PinDirs::new(root);
        for dir in [&dirs.root, &dirs.maps, &dirs.links] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        check_pinned_layouts(&dirs.maps)?;
        // aya-log's level is a global in the object: 0 compiles every log statement out of the
        // verifier's view at load time, so the packet path pays nothing when logging is off.
        let level: u8 = if datapath_log {
            4 /* debug */
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dirs.maps)
            .override_global("AYA_LOG_LEVEL", &level, true)
            .load(PROGRAMS)?;
        let map_pins = ebpf
            .maps()
            .map(|(name, _)| (name.to_owned(), dirs.maps.join(name)))
            .filter(|(_, path)| path.exists())
            .map(|(name, path)| {
                let data = MapData::from_pin(&path).map_err(|source| DatapathError::Map {
                    name: "pinned map",
                    source,
                })?;
                Ok((name, data))
            })
            .collect::<Result<Vec<_>, DatapathError>>()?;
        let logger = if datapath_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "datapath log unavailable");
                    None
                }
            }
        } else {
            None
        };
        for hook in Hook::ALL {
            let name = hook.program();
            classifier(&mut ebpf, hook)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let events = RingBuf::try_from(take(&mut ebpf, map::EVENTS)?).map_err(|source| {
            DatapathError::Map {
                name: map::EVENTS,
                source,
            }
        })?;
        let state = PinnedView {
            auth: typed(&mut ebpf, map::AUTH)?,
            flows: typed(&mut ebpf, map::FLOWS)?,
            counters: typed(&mut ebpf, map::COUNTERS)?,
            names: typed(&mut ebpf, map::NAMES)?,
        };
        let auth = state.auth_entries()?.into_iter().collect();
        let dp = Self {
            ep_v4: typed(&mut ebpf, map::ENDPOINTS_V4)?,
            ep_v6: typed(&mut ebpf, map::ENDPOINTS_V6)?,
            syn_rto: typed(&mut ebpf, map::SYN_RTO)?,
            state,
            auth,
            dirs,
            ebpf,
            map_pins,
        };
        Ok((dp, Channels { events, logger }))
    }

    #[must_use]
    pub fn dirs(&self) -> &PinDirs {
        &self.dirs
    }

    /// Attaches both programs to a pod's host-side interface, adopting pinned links.
    pub fn attach(&mut self, iface: &Interface) -> Result<Attached, DatapathError> {
        // A link lives on only while pinned: never attach one that cannot be (the pin
        // directory removed, bpffs unmounted), or it would go with the agent.
        pin_dir(&self.dirs.links)?;
        let mut outcome = Attached::Adopted;
        for hook in Hook::ALL {
            if self.attach_hook(iface, hook)? == Attached::New {
                outcome = Attached::New;
            }
        }
        Ok(outcome)
    }

    fn attach_hook(&mut self, iface: &Interface, hook: Hook) -> Result<Attached, DatapathError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            iface: iface.name.clone(),
            ifindex: iface.index,
            hook,
            source,
        };
        let path = self.dirs.link(iface.index, hook);
        let prog = classifier(&mut self.ebpf, hook)?;
        if path.exists() {
            let adopted = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|pinned| {
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())
                })
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match adopted {
                Ok(id) => {
                    // The link stays pinned; release the program's handle on it without
                    // detaching (dropping an `FdLink` only closes our descriptor).
                    let link = prog.take_link(id).map_err(|e| err(e.into()))?;
                    drop(FdLink::try_from(link).map_err(|e| err(e.into()))?);
                    return Ok(Attached::Adopted);
                }
                Err(reason) => {
                    // A link whose interface is gone (the pod was deleted while we were down,
                    // and its index reused) cannot be updated: replace it.
                    tracing::info!(pin = %path.display(), %reason, "replacing stale pinned link");
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        let id = prog
            .attach(
                iface.index,
                TcAttach::Tcx {
                    attach_type: hook.attach_type(),
                    order: LinkOrder::default(),
                },
            )
            .map_err(|e| err(e.into()))?;
        let link = prog.take_link(id).map_err(|e| err(e.into()))?;
        let fd = FdLink::try_from(link).map_err(|e| err(e.into()))?;
        fd.pin(&path).map_err(|e| err(e.into()))?;
        Ok(Attached::New)
    }

    /// Attaches the sockops program to `cgroup` and sets the initial SYN timeout it gives
    /// connections of pairs not yet authenticated (`jiffies`; 0 leaves the kernel's). A link
    /// pinned by an earlier run is replaced after the new one is attached, so there is no
    /// moment without the program (which only shortens timeouts: it never admits anything).
    pub fn attach_sock_ops(&mut self, cgroup: &Path, jiffies: u32) -> Result<(), DatapathError> {
        let name = program::SOCK_OPS;
        let prog: &mut SockOps = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let dir = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let id = prog
            // Through a link (kernel ≥ 5.7), which always coexists with other programs on the
            // cgroup; the kernel refuses the ALLOW_MULTI flag there, hence `Single` (no flags).
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::Program {
            name,
            source: ProgramError::from(e),
        })?;
        let path = self.dirs.sock_ops_link();
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        link.pin(&path).map_err(pin_err(&path))?;
        self.set_syn_rto(jiffies)
    }

    /// Removes the sockops link (first connections keep the kernel's timeout).
    pub fn detach_sock_ops(&mut self) -> Result<(), DatapathError> {
        self.set_syn_rto(0)?;
        let path = self.dirs.sock_ops_link();
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn set_syn_rto(&mut self, jiffies: u32) -> Result<(), DatapathError> {
        self.syn_rto
            .set(0, &jiffies, 0)
            .map_err(|source| DatapathError::Map {
                name: map::SYN_RTO,
                source,
            })
    }

    /// Whether both of an interface's links are still pinned: a pin removed from outside
    /// (bpffs cleaned up, unmounted) takes its link, and enforcement, with it.
    #[must_use]
    pub fn pinned(&self, ifindex: u32) -> bool {
        Hook::ALL
            .iter()
            .all(|h| self.dirs.link(ifindex, *h).exists())
    }

    /// Pins again, from the agent's own handles, the maps whose pins were removed while it
    /// ran (re-creating the directory), and returns their names. Without this the maps would
    /// live on only as long as the agent: the next one would start from empty maps.
    pub fn repin_maps(&self) -> Result<Vec<&str>, DatapathError> {
        let missing: Vec<_> = self
            .map_pins
            .iter()
            .filter(|(name, _)| !self.dirs.maps.join(name).exists())
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        pin_dir(&self.dirs.maps)?;
        let mut pinned = Vec::new();
        for (name, data) in missing {
            let path = self.dirs.maps.join(name);
            data.pin(&path).map_err(pin_err(&path))?;
            pinned.push(name.as_str());
        }
        Ok(pinned)
    }

    /// Detaches from an interface by removing its pins (the kernel releases a link when its
    /// last reference goes). Missing pins are not an error: the interface may be gone.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in Hook::ALL {
            let path = self.dirs.link(ifindex, hook);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Result<StdHashMap<IpAddr, Endpoint>, DatapathError> {
        let mut out = StdHashMap::new();
        for entry in self.ep_v4.iter() {
            let (k, v) = entry.map_err(|source| DatapathError::Map {
                name: map::ENDPOINTS_V4,
                source,
            })?;
            out.insert(IpAddr::from(k), v);
        }
        for entry in self.ep_v6.iter() {
            let (k, v) = entry.map_err(|source| DatapathError::Map {
                name: map::ENDPOINTS_V6,
                source,
            })?;
            out.insert(IpAddr::from(k), v);
        }
        Ok(out)
    }

    pub fn set_endpoint(&mut self, addr: IpAddr, ep: &Endpoint) -> Result<(), DatapathError> {
        match addr {
            IpAddr::V4(a) => {
                self.ep_v4
                    .insert(&a.octets(), ep, 0)
                    .map_err(|source| DatapathError::Map {
                        name: map::ENDPOINTS_V4,
                        source,
                    })
            }
            IpAddr::V6(a) => {
                self.ep_v6
                    .insert(&a.octets(), ep, 0)
                    .map_err(|source| DatapathError::Map {
                        name: map::ENDPOINTS_V6,
                        source,
                    })
            }
        }
    }

    pub fn remove_endpoint(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        let r = match addr {
            IpAddr::V4(a) => self
                .ep_v4
                .remove(&a.octets())
                .map_err(|source| DatapathError::Map {
                    name: map::ENDPOINTS_V4,
                    source,
                }),
            IpAddr::V6(a) => self
                .ep_v6
                .remove(&a.octets())
                .map_err(|source| DatapathError::Map {
                    name: map::ENDPOINTS_V6,
                    source,
                }),
        };
        ignore_missing(r)
    }

    /// Writes (or renews) an auth entry: new connections of the pair are admitted until
    /// `value.expires_ns`.
    pub fn allow_pair(&mut self, key: &AuthKey, value: &AuthValue) -> Result<(), DatapathError> {
        self.state
            .auth
            .insert(key, value, 0)
            .map_err(|source| DatapathError::Map {
                name: map::AUTH,
                source,
            })?;
        self.auth.insert(*key, *value);
        Ok(())
    }

    /// Removes an auth entry; `false` when there was none.
    pub fn revoke_pair(&mut self, key: &AuthKey) -> Result<bool, DatapathError> {
        let removed = match self.state.auth.remove(key) {
            Ok(()) => true,
            Err(e) if is_missing(&e) => false,
            Err(source) => {
                return Err(DatapathError::Map {
                    name: map::AUTH,
                    source,
                });
            }
        };
        self.auth.remove(key);
        Ok(removed)
    }

    /// The auth map's entries (from the agent's copy, see [`Datapath::auth`]).
    pub fn auth_entries(&self) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
        Ok(self.auth.iter().map(|(k, v)| (*k, *v)).collect())
    }

    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        self.state.flows()
    }

    /// Deletes every flow `cut` selects: their next packet in either direction is dropped.
    pub fn cut_flows(
        &mut self,
        mut cut: impl FnMut(&FlowKey, &FlowValue) -> bool,
    ) -> Result<usize, DatapathError> {
        let doomed: Vec<FlowKey> = self
            .flows()?
            .into_iter()
            .filter(|(k, v)| cut(k, v))
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            ignore_missing(
                self.state
                    .flows
                    .remove(key)
                    .map_err(|source| DatapathError::Map {
                        name: map::FLOWS,
                        source,
                    }),
            )?;
        }
        Ok(doomed.len())
    }

    /// Packet counters summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        self.state.counters()
    }

    pub fn names(&self) -> Result<Vec<(NameKey, String)>, DatapathError> {
        self.state.names()
    }

    pub fn set_name(&mut self, key: &NameKey, name: &str) -> Result<(), DatapathError> {
        if name.len() > NAME_MAX {
            return Err(DatapathError::NameTooLong {
                name: name.chars().take(64).collect(),
                len: name.len(),
            });
        }
        let mut value = Name {
            len: name.len() as u32,
            bytes: [0; NAME_MAX],
        };
        value.bytes[..name.len()].copy_from_slice(name.as_bytes());
        self.state
            .names
            .insert(key, &value, 0)
            .map_err(|source| DatapathError::Map {
                name: map::NAMES,
                source,
            })
    }
}

fn name_str(v: &Name) -> String {
    let len = (v.len as usize).min(NAME_MAX);
    String::from_utf8_lossy(&v.bytes[..len]).into_owned()
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(Counter, u64)>, DatapathError> {
    let mut out = Vec::with_capacity(Counter::ALL.len());
    for c in Counter::ALL {
        let values = map
            .get(&(c as u32), 0)
            .map_err(|source| DatapathError::Map {
                name: map::COUNTERS,
                source,
            })?;
        out.push((c, values.iter().sum()));
    }
    Ok(out)
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &'static str,
) -> Result<Vec<(K, V)>, DatapathError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| DatapathError::Map { name, source })
}

fn is_missing(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

fn ignore_missing(r: Result<(), DatapathError>) -> Result<(), DatapathError> {
    match r {
        Err(DatapathError::Map { source, .. }) if is_missing(&source) => Ok(()),
        other => other,
    }
}

/// The program for `hook`.
fn classifier(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
    let name = hook.program();
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap { name })
}

fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(take(ebpf, name)?).map_err(|source| DatapathError::Map { name, source })
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

/// Pinned maps left by an earlier version whose layout differs cannot be adopted: say so
/// plainly rather than fail in the verifier.
fn check_pinned_layouts(maps: &Path) -> Result<(), DatapathError> {
    let value_size: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::value_size;
    let key_size: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::key_size;
    let entries: fn(&aya::maps::MapInfo) -> u32 = aya::maps::MapInfo::max_entries;
    let expected = [
        (
            map::AUTH,
            "the value size",
            size_of::<AuthValue>() as u32,
            value_size,
        ),
        (
            map::FLOWS,
            "the value size",
            size_of::<FlowValue>() as u32,
            value_size,
        ),
        (
            map::ENDPOINTS_V4,
            "the value size",
            size_of::<Endpoint>() as u32,
            value_size,
        ),
        (
            map::COUNTERS,
            "the number of counters",
            Counter::COUNT,
            entries,
        ),
        // Endpoints were an LPM trie (key: prefix length + address) before they were a hash.
        (map::ENDPOINTS_V4, "the key size", 4, key_size),
    ];
    for (name, what, want, read) in expected {
        let path = maps.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::Map {
            name: "pinned map",
            source,
        })?;
        let found = read(&info);
        if found != want {
            return Err(DatapathError::Incompatible {
                path,
                what,
                found,
                want,
            });
        }
    }
    Ok(())
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones. Read from the mount table, never assumed.
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The kernel's `CONFIG_HZ`, measured: the jiffies counter of `/proc/timer_list` over 100 ms,
/// rounded to the nearest value kernels are built with.
pub fn kernel_hz() -> Result<u32, String> {
    fn jiffies() -> Result<u64, String> {
        let text =
            fs::read_to_string("/proc/timer_list").map_err(|e| format!("/proc/timer_list: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())
            .ok_or_else(|| "/proc/timer_list has no `jiffies:` line".to_owned())
    }
    let (j0, t0) = (jiffies()?, std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (j1, t1) = (jiffies()?, std::time::Instant::now());
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let measured = (j1.saturating_sub(j0)) as f64 / t1.duration_since(t0).as_secs_f64();
    let nearest = [100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .unwrap_or(250);
    if (f64::from(nearest) - measured).abs() > f64::from(nearest) * 0.2 {
        return Err(format!(
            "measured {measured:.0} jiffies per second, not near 100, 250, 300 or 1000; set first_connection.kernel_hz"
        ));
    }
    Ok(nearest)
}

/// The maps that hold state worth reading back: opened from the pins by `status` when the
/// agent is down, and held by the running agent's [`Datapath`].
pub struct PinnedView {
    counters: PerCpuArray<MapData, u64>,
    auth: HashMap<MapData, AuthKey, AuthValue>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    names: HashMap<MapData, NameKey, Name>,
}

impl PinnedView {
    pub fn open(root: &Path) -> Result<Self, DatapathError> {
        let dirs = PinDirs::new(root);
        fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(
            dirs: &PinDirs,
            name: &'static str,
            wrap: fn(MapData) -> aya::maps::Map,
        ) -> Result<T, DatapathError> {
            let data = MapData::from_pin(dirs.maps.join(name))
                .map_err(|source| DatapathError::Map { name, source })?;
            T::try_from(wrap(data)).map_err(|source| DatapathError::Map { name, source })
        }
        Ok(Self {
            counters: open(&dirs, map::COUNTERS, aya::maps::Map::PerCpuArray)?,
            auth: open(&dirs, map::AUTH, aya::maps::Map::HashMap)?,
            flows: open(&dirs, map::FLOWS, aya::maps::Map::LruHashMap)?,
            names: open(&dirs, map::NAMES, aya::maps::Map::HashMap)?,
        })
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        read_counters(&self.counters)
    }

    pub fn auth_entries(&self) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
        collect(self.auth.iter(), map::AUTH)
    }

    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        collect(self.flows.iter(), map::FLOWS)
    }

    pub fn names(&self) -> Result<Vec<(NameKey, String)>, DatapathError> {
        let mut out = Vec::new();
        for entry in self.names.iter() {
            let (k, v) = entry.map_err(|source| DatapathError::Map {
                name: map::NAMES,
                source,
            })?;
            out.push((k, name_str(&v)));
        }
        Ok(out)
    }
}
