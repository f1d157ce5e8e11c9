//! Program attachment: the TCX links on pods' interfaces and the sockops link on the pods'
//! cgroup, each pinned so that it outlives the agent, and adopted by the next one.

use std::{fs, io, path::Path};

use aya::programs::{
    CgroupAttachMode, LinkOrder, ProgramError, SockOps, TcAttach,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use portcullis_common::{map, program};

use super::{
    Attached, Datapath, DatapathError, Hook, Interface, classifier, io_err, pin_dir, pin_err,
};

impl Datapath {
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
            // Adopting replaces the program inside the pinned link (`bpf_link_update`): the
            // link keeps its place in the interface's chain. That is first for a link attached
            // first (below), but a link of an earlier version, which attached last, stays
            // after the CNI's programs until it is attached anew (the pod's interface
            // recreated, or `portcullis uninstall` and a start).
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
                    // Ahead of whatever is already on the interface (the CNI's own TCX
                    // programs): our drop must not depend on a program before us passing the
                    // packet on, and our pass (`TCX_NEXT`) hands it to them. A program that
                    // another agent attaches later with `BPF_F_BEFORE` still goes ahead of us.
                    order: LinkOrder::first(),
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
}

impl super::Links for Datapath {
    fn attach(&mut self, iface: &Interface) -> Result<Attached, DatapathError> {
        Datapath::attach(self, iface)
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        Datapath::detach(self, ifindex)
    }

    fn pinned(&self, ifindex: u32) -> bool {
        Datapath::pinned(self, ifindex)
    }
}
