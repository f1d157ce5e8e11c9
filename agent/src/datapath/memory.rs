//! In-memory stand-ins for the kernel maps, with the same capacity behaviour, so that the
//! owners' logic (reconciliation, revalidation, entry writes) is unit-tested without root.

use std::{cell::RefCell, collections::HashMap, io, net::IpAddr};

use portcullis_common::{AuthKey, AuthValue, Endpoint, FlowKey, FlowValue, NameKey, map};

use super::{
    Attached, AuthMap, DatapathError, EndpointMap, FlowStats, FlowTable, Interface, Kernel, Links,
    NameMap,
    route::{RouteError, Routes},
};
use portcullis_common::Counter;

#[derive(Debug, Default)]
pub struct Maps {
    pub endpoints: HashMap<IpAddr, Endpoint>,
    pub auth: HashMap<AuthKey, AuthValue>,
    pub flows: HashMap<FlowKey, FlowValue>,
    pub names: HashMap<NameKey, String>,
    /// Capacities; `usize::MAX` when unset.
    pub endpoint_capacity: Option<usize>,
    pub auth_capacity: Option<usize>,
    /// Auth map writes, and removals, fail while set (a transient kernel error).
    pub fail_auth_writes: bool,
    pub fail_auth_removals: bool,
    /// Flows the agent removed.
    pub flows_removed: u64,
    /// Interfaces with programs attached.
    pub links: std::collections::BTreeSet<u32>,
}

impl Links for Maps {
    fn attach(&mut self, iface: &Interface) -> Result<Attached, DatapathError> {
        Ok(if self.links.insert(iface.index) {
            Attached::New
        } else {
            Attached::Adopted
        })
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.links.remove(&ifindex);
        Ok(())
    }

    fn pinned(&self, ifindex: u32) -> bool {
        self.links.contains(&ifindex)
    }
}

fn full(name: &'static str, capacity: usize) -> DatapathError {
    DatapathError::Full {
        name,
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
    }
}

impl EndpointMap for Maps {
    fn set_endpoint(&mut self, addr: IpAddr, ep: &Endpoint) -> Result<(), DatapathError> {
        if let Some(cap) = self.endpoint_capacity {
            let family = self
                .endpoints
                .keys()
                .filter(|a| a.is_ipv4() == addr.is_ipv4())
                .count();
            if !self.endpoints.contains_key(&addr) && family >= cap {
                return Err(full(map::ENDPOINTS_V4, cap));
            }
        }
        self.endpoints.insert(addr, *ep);
        Ok(())
    }

    fn remove_endpoint(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        self.endpoints.remove(&addr);
        Ok(())
    }
}

impl AuthMap for Maps {
    fn allow_pair(&mut self, key: &AuthKey, value: &AuthValue) -> Result<(), DatapathError> {
        if self.fail_auth_writes {
            return Err(DatapathError::Io {
                path: map::AUTH.into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        if let Some(cap) = self.auth_capacity
            && !self.auth.contains_key(key)
            && self.auth.len() >= cap
        {
            return Err(full(map::AUTH, cap));
        }
        self.auth.insert(*key, *value);
        Ok(())
    }

    fn revoke_pair(&mut self, key: &AuthKey) -> Result<bool, DatapathError> {
        if self.fail_auth_removals {
            return Err(DatapathError::Io {
                path: map::AUTH.into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        Ok(self.auth.remove(key).is_some())
    }
}

impl FlowTable for Maps {
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        Ok(self.flows.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn remove_flows(&mut self, keys: &[FlowKey]) -> Result<usize, DatapathError> {
        let n = keys
            .iter()
            .filter(|k| self.flows.remove(k).is_some())
            .count();
        self.flows_removed += n as u64;
        Ok(n)
    }
}

impl NameMap for Maps {
    fn set_name(&mut self, key: &NameKey, name: &str) -> Result<(), DatapathError> {
        self.names.insert(*key, name.to_owned());
        Ok(())
    }

    fn remove_name(&mut self, key: &NameKey) -> Result<(), DatapathError> {
        self.names.remove(key);
        Ok(())
    }
}

impl Kernel for Maps {
    fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        Ok(Counter::ALL.iter().map(|c| (*c, 0)).collect())
    }

    fn flow_stats(&self) -> Result<FlowStats, DatapathError> {
        Ok(FlowStats {
            recorded: self.flows.len() as u64 + self.flows_removed,
            replaced: 0,
            removed: self.flows_removed,
        })
    }

    fn repin_maps(&self) -> Result<Vec<String>, DatapathError> {
        Ok(Vec::new())
    }

    fn pin_dir(&self) -> std::path::PathBuf {
        "memory".into()
    }

    fn set_clock(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
}

/// Routes as a test sets them: address → interface, or no route.
#[derive(Default)]
pub struct FakeRoutes {
    pub routes: RefCell<HashMap<IpAddr, Interface>>,
    /// Interfaces that exist, by index.
    pub links: RefCell<HashMap<u32, String>>,
    pub host: Vec<IpAddr>,
    /// Interfaces that are bridges.
    pub bridges: RefCell<std::collections::HashSet<u32>>,
}

impl FakeRoutes {
    /// Routes `addr` through a new interface `index`.
    pub fn pod(&self, addr: &str, index: u32) {
        let name = format!("veth{index}");
        self.routes.borrow_mut().insert(
            addr.parse().unwrap(),
            Interface {
                index,
                name: name.clone(),
            },
        );
        self.links.borrow_mut().insert(index, name);
    }
}

impl Routes for FakeRoutes {
    fn lookup(&self, addr: IpAddr) -> Result<Interface, RouteError> {
        self.routes
            .borrow()
            .get(&addr)
            .cloned()
            .ok_or(RouteError::NoRoute {
                addr,
                source: io::Error::from_raw_os_error(libc::ENETUNREACH),
            })
    }

    fn interface(&self, index: u32) -> Option<String> {
        self.links.borrow().get(&index).cloned()
    }

    fn is_bridge(&self, iface: &Interface) -> bool {
        self.bridges.borrow().contains(&iface.index)
    }

    fn local_addresses(&self) -> io::Result<Vec<IpAddr>> {
        Ok(self.host.clone())
    }
}
