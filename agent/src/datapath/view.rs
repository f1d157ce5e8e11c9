//! The pinned maps worth reading back, opened by `status` when the agent is down and held by
//! the running agent's datapath.

use std::path::Path;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use portcullis_common::{
    AuthKey, AuthValue, Counter, FlowKey, FlowValue, NAME_MAX, Name, NameKey, map,
};

use super::{DatapathError, PinDirs};

/// The maps that hold state worth reading back: opened from the pins by `status` when the
/// agent is down, and held by the running agent's [`Datapath`].
pub struct PinnedView {
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) auth: HashMap<MapData, AuthKey, AuthValue>,
    pub(super) flows: HashMap<MapData, FlowKey, FlowValue>,
    pub(super) names: HashMap<MapData, NameKey, Name>,
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
