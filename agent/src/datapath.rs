//! The kernel side: loading, attaching, pinning and adopting the programs, and typed access to
//! every map. The only module that touches aya.
//!
//! Lifecycle. Maps are pinned by name under `<bpffs_dir>/maps/` and TCX links under
//! `<bpffs_dir>/links/`. Pinned links keep the programs attached after the agent exits, so
//! enforcement has no gap while it is down. A restarted agent loads its programs against the
//! same pinned maps (state survives: auth entries, flows, counters) and *replaces the program
//! inside each pinned link* with `bpf_link_update`, an atomic swap: no packet ever meets an
//! interface without a program, and no established flow is reset.

mod batch;
mod events;
mod host;
mod links;
#[cfg(test)]
pub mod memory;
mod pins;
pub mod route;
mod view;

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    net::IpAddr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf},
    programs::{ProgramError, SchedClassifier, TcAttachType},
};
use portcullis_common::{
    AuthKey, AuthValue, Counter, Endpoint, FLOW_STAT_RECORDED, FLOW_STAT_REMOVED,
    FLOW_STAT_REPLACED, FlowKey, FlowValue, NAME_MAX, Name, NameKey, map, program,
};
use serde::Serialize;

use self::pins::{BPFFS_MOUNT, check_pinned_layouts, pin_dir, pin_err};
pub use self::{
    events::{decode_event, forward_log, read_events},
    host::{cgroup2_mount, kernel_hz},
    pins::{PinDirs, Removed, ensure_bpffs, is_bpffs, uninstall},
    route::Interface,
    view::PinnedView,
};

/// The kernel programs, built by `build.rs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));
/// Size of the embedded object (for `doctor`).
pub const PROGRAMS_LEN: usize = include_bytes!(concat!(env!("OUT_DIR"), "/portcullis")).len();

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

    pub(crate) const fn program(self) -> &'static str {
        match self {
            Self::ToPod => program::TO_POD,
            Self::FromPod => program::FROM_POD,
        }
    }

    pub(crate) const fn attach_type(self) -> TcAttachType {
        match self {
            Self::ToPod => TcAttachType::Egress,
            Self::FromPod => TcAttachType::Ingress,
        }
    }

    pub(crate) const fn pin_suffix(self) -> &'static str {
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

/// How an interface got its programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attached {
    /// A pinned link existed: its program was replaced atomically.
    Adopted,
    /// A new link was created and pinned.
    New,
}

/// The maps the endpoint owner writes: address → who it is (and, for a local pod, its
/// interface and policy settings).
pub trait EndpointMap {
    fn set_endpoint(&mut self, addr: IpAddr, ep: &Endpoint) -> Result<(), DatapathError>;
    /// Missing addresses are not an error.
    fn remove_endpoint(&mut self, addr: IpAddr) -> Result<(), DatapathError>;
}

/// The auth map: which identity pairs are authenticated, until when, on which ports.
pub trait AuthMap {
    fn allow_pair(&mut self, key: &AuthKey, value: &AuthValue) -> Result<(), DatapathError>;
    /// `false` when there was no entry.
    fn revoke_pair(&mut self, key: &AuthKey) -> Result<bool, DatapathError>;
}

/// The flow table: the kernel records connections, the agent reads and cuts them.
pub trait FlowTable {
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError>;
    /// Removes `keys` (their next packet in either direction is dropped); returns how many were
    /// there.
    fn remove_flows(&mut self, keys: &[FlowKey]) -> Result<usize, DatapathError>;
}

/// The numbering of identities and nodes, kept in bpffs so that it survives a restart.
pub trait NameMap {
    fn set_name(&mut self, key: &NameKey, name: &str) -> Result<(), DatapathError>;
    fn remove_name(&mut self, key: &NameKey) -> Result<(), DatapathError>;
}

/// The programs on pods' interfaces: attached through links pinned in bpffs, so that they stay
/// when the agent stops.
pub trait Links {
    /// Attaches both programs to a pod's host-side interface, adopting pinned links.
    fn attach(&mut self, iface: &Interface) -> Result<Attached, DatapathError>;
    /// Detaches by removing the pins; missing pins are not an error (the interface may be gone).
    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Whether both of an interface's links are still pinned.
    fn pinned(&self, ifindex: u32) -> bool;
}

/// Everything the core asks of the kernel: the maps its owners write, the links, and what it
/// reads for `status`. [`Datapath`] is the real one; `memory::Maps` stands in for it in tests.
pub trait Kernel: EndpointMap + AuthMap + FlowTable + NameMap + Links {
    /// Packet counters summed over CPUs, in [`Counter::ALL`] order.
    fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError>;
    fn flow_stats(&self) -> Result<FlowStats, DatapathError>;
    /// Pins again the maps whose pins were removed while the agent ran; returns their names.
    fn repin_maps(&self) -> Result<Vec<String>, DatapathError>;
    /// Where the map pins live (for the log).
    fn pin_dir(&self) -> PathBuf;
    /// Tells the programs `CLOCK_REALTIME − CLOCK_BOOTTIME`, the clock connection MACs are
    /// stamped with (it moves when the wall clock is stepped).
    fn set_clock(&mut self) -> Result<(), DatapathError>;
}

/// What happened to the flow table since its maps were created: flows the kernel recorded
/// (new keys, and keys it recorded again), and entries the agent removed. What was recorded
/// and neither removed nor still there was evicted by the kernel's LRU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub recorded: u64,
    pub replaced: u64,
    pub removed: u64,
}

impl FlowStats {
    /// Entries the LRU evicted, given how many the table holds now.
    #[must_use]
    pub fn evicted(&self, present: u64) -> u64 {
        self.recorded
            .saturating_sub(self.removed)
            .saturating_sub(present)
    }
}

pub struct Datapath {
    dirs: PinDirs,
    ebpf: Ebpf,
    ep_v4: HashMap<MapData, [u8; 4], Endpoint>,
    ep_v6: HashMap<MapData, [u8; 16], Endpoint>,
    syn_rto: Array<MapData, u32>,
    clock: Array<MapData, u64>,
    flow_stats: PerCpuArray<MapData, u64>,
    state: PinnedView,
    /// A second handle on each pinned map, by name: a pin removed while the agent runs is
    /// made again from it, so that the next agent still finds the state; the flow table's is
    /// also used for batched reads and deletions.
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
        let carried = check_pinned_layouts(&dirs.maps)?;
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
        let mut dp = Self {
            ep_v4: typed(&mut ebpf, map::ENDPOINTS_V4)?,
            ep_v6: typed(&mut ebpf, map::ENDPOINTS_V6)?,
            syn_rto: typed(&mut ebpf, map::SYN_RTO)?,
            clock: typed(&mut ebpf, map::CLOCK)?,
            flow_stats: typed(&mut ebpf, map::FLOW_STATS)?,
            state,
            dirs,
            ebpf,
            map_pins,
        };
        // Before any program is attached: a SYN is never stamped with the boot clock.
        Kernel::set_clock(&mut dp)?;
        for (k, v) in &carried {
            dp.allow_pair(k, v)?;
        }
        Ok((dp, Channels { events, logger }))
    }

    #[must_use]
    pub fn dirs(&self) -> &PinDirs {
        &self.dirs
    }

    /// The endpoint maps' entries (read once, at start, by their owner).
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

    /// The auth map's entries, read from the kernel (once, at start, by their owner: the agent
    /// is the map's only writer and keeps its own copy from then on).
    pub fn auth_entries(&self) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
        self.state.auth_entries()
    }

    pub fn names(&self) -> Result<Vec<(NameKey, String)>, DatapathError> {
        self.state.names()
    }

    /// Adds `n` to the agent's count of removed flows (in CPU 0's slot of the pinned stats, so
    /// that it survives a restart with the kernel's own counts).
    fn count_removed(&mut self, n: u64) -> Result<(), DatapathError> {
        let err = |source| DatapathError::Map {
            name: map::FLOW_STATS,
            source,
        };
        let values = self.flow_stats.get(&FLOW_STAT_REMOVED, 0).map_err(err)?;
        let mut v: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = v.first_mut() {
            *first = first.saturating_add(n);
        }
        let values = PerCpuValues::try_from(v).map_err(|e| DatapathError::Io {
            path: self.dirs.maps.join(map::FLOW_STATS),
            source: e,
        })?;
        self.flow_stats
            .set(FLOW_STAT_REMOVED, values, 0)
            .map_err(err)
    }

    fn flow_pin(&self) -> Result<&MapData, DatapathError> {
        self.map_pins
            .iter()
            .find(|(n, _)| n == map::FLOWS)
            .map(|(_, d)| d)
            .ok_or(DatapathError::MissingMap { name: map::FLOWS })
    }
}

impl Kernel for Datapath {
    fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        self.state.counters()
    }

    fn flow_stats(&self) -> Result<FlowStats, DatapathError> {
        let slot = |i: u32| -> Result<u64, DatapathError> {
            let values = self
                .flow_stats
                .get(&i, 0)
                .map_err(|source| DatapathError::Map {
                    name: map::FLOW_STATS,
                    source,
                })?;
            Ok(values.iter().sum())
        };
        Ok(FlowStats {
            recorded: slot(FLOW_STAT_RECORDED)?,
            replaced: slot(FLOW_STAT_REPLACED)?,
            removed: slot(FLOW_STAT_REMOVED)?,
        })
    }

    fn repin_maps(&self) -> Result<Vec<String>, DatapathError> {
        Datapath::repin_maps(self).map(|m| m.into_iter().map(str::to_owned).collect())
    }

    fn pin_dir(&self) -> PathBuf {
        self.dirs.maps.clone()
    }

    fn set_clock(&mut self) -> Result<(), DatapathError> {
        let offset = crate::status::real_ns().wrapping_sub(crate::status::boot_ns());
        self.clock
            .set(0, &offset, 0)
            .map_err(|source| DatapathError::Map {
                name: map::CLOCK,
                source,
            })
    }
}

impl EndpointMap for Datapath {
    fn set_endpoint(&mut self, addr: IpAddr, ep: &Endpoint) -> Result<(), DatapathError> {
        match addr {
            IpAddr::V4(a) => self.ep_v4.insert(&a.octets(), ep, 0),
            IpAddr::V6(a) => self.ep_v6.insert(&a.octets(), ep, 0),
        }
        .map_err(|source| DatapathError::Map {
            name: if addr.is_ipv4() {
                map::ENDPOINTS_V4
            } else {
                map::ENDPOINTS_V6
            },
            source,
        })
    }

    fn remove_endpoint(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        let r = match addr {
            IpAddr::V4(a) => self.ep_v4.remove(&a.octets()),
            IpAddr::V6(a) => self.ep_v6.remove(&a.octets()),
        };
        ignore_missing(r.map_err(|source| DatapathError::Map {
            name: if addr.is_ipv4() {
                map::ENDPOINTS_V4
            } else {
                map::ENDPOINTS_V6
            },
            source,
        }))
    }
}

impl AuthMap for Datapath {
    fn allow_pair(&mut self, key: &AuthKey, value: &AuthValue) -> Result<(), DatapathError> {
        self.state
            .auth
            .insert(key, value, 0)
            .map_err(|source| DatapathError::Map {
                name: map::AUTH,
                source,
            })
    }

    fn revoke_pair(&mut self, key: &AuthKey) -> Result<bool, DatapathError> {
        match self.state.auth.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(source) => Err(DatapathError::Map {
                name: map::AUTH,
                source,
            }),
        }
    }
}

impl FlowTable for Datapath {
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        batch::read_all(self.flow_pin()?).map_err(|e| DatapathError::Io {
            path: self.dirs.maps.join(map::FLOWS),
            source: e,
        })
    }

    fn remove_flows(&mut self, keys: &[FlowKey]) -> Result<usize, DatapathError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let removed = batch::delete(self.flow_pin()?, keys).map_err(|e| DatapathError::Io {
            path: self.dirs.maps.join(map::FLOWS),
            source: e,
        })?;
        self.count_removed(removed as u64)?;
        Ok(removed)
    }
}

impl NameMap for Datapath {
    fn set_name(&mut self, key: &NameKey, name: &str) -> Result<(), DatapathError> {
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

    fn remove_name(&mut self, key: &NameKey) -> Result<(), DatapathError> {
        ignore_missing(
            self.state
                .names
                .remove(key)
                .map_err(|source| DatapathError::Map {
                    name: map::NAMES,
                    source,
                }),
        )
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
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
pub(crate) fn classifier(
    ebpf: &mut Ebpf,
    hook: Hook,
) -> Result<&mut SchedClassifier, DatapathError> {
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
