//! The few `bpf(2)` commands the CNI plugin needs, without loading the agent's object (which
//! would create every map): load a two-instruction program that drops every packet, attach
//! it with TCX ahead of any other program, pin the link where the agent adopts it, and read
//! back which interface and hook a pinned link holds.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use crate::datapath::Hook;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_LINK_TYPE_TCX: u32 = 11;
/// With `relative_fd` 0: ahead of every program already attached.
const BPF_F_BEFORE: u32 = 1 << 3;

// The instructions below are written as little-endian `struct bpf_insn`s.
#[cfg(not(target_endian = "little"))]
compile_error!("portcullis-cni's default-deny program is encoded for little-endian hosts");

/// `r0 = TC_ACT_SHOT; exit`: every packet dropped, whatever follows in the chain.
const DENY: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2
    0xb7 | (2 << 32),
    // BPF_JMP | BPF_EXIT
    0x95,
];

/// The name the default-deny program has in `bpftool prog` listings.
pub const DENY_NAME: &str = "pc_cni_deny";

/// `union bpf_attr`, zero beyond what each command sets.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn call(&mut self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: a zero-initialised `bpf_attr` of the size passed; the pointers the callers
        // set point to buffers that outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                std::mem::size_of::<Self>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn fd(&mut self, cmd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        // SAFETY: these commands return a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

const fn attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::ToPod => BPF_TCX_EGRESS,
        Hook::FromPod => BPF_TCX_INGRESS,
    }
}

/// Loads the default-deny program.
pub fn load_deny() -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..DENY_NAME.len()].copy_from_slice(DENY_NAME.as_bytes());
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, u32::try_from(DENY.len()).map_err(io::Error::other)?)
        .u64(8, DENY.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64);
    // prog_name, after log_level, log_size, log_buf, kern_version, prog_flags.
    attr.0[48..64].copy_from_slice(&name);
    attr.fd(BPF_PROG_LOAD)
}

/// Attaches `prog` at `hook` of interface `ifindex` ahead of every program there, and pins
/// the link at `pin` (the path the agent adopts it from).
pub fn attach_first(prog: &OwnedFd, ifindex: u32, hook: Hook, pin: &Path) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(
        0,
        u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?,
    )
    .u32(4, ifindex)
    .u32(8, attach_type(hook))
    .u32(12, BPF_F_BEFORE);
    let link = attr.fd(BPF_LINK_CREATE)?;
    let path = c_path(pin)?;
    let mut attr = Attr::new();
    attr.u64(0, path.as_ptr() as u64).u32(
        8,
        u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
    );
    attr.call(BPF_OBJ_PIN).map(drop)
}

/// What a pinned TCX link holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedTcx {
    pub ifindex: u32,
    pub hook: Option<Hook>,
    pub prog_id: u32,
}

/// Reads the link pinned at `pin`.
pub fn pinned_tcx(pin: &Path) -> io::Result<PinnedTcx> {
    let path = c_path(pin)?;
    let mut attr = Attr::new();
    attr.u64(0, path.as_ptr() as u64);
    let fd = attr.fd(BPF_OBJ_GET)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the tcx union: ifindex,
    // attach_type.
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.u32(0, u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?)
        .u32(4, u32::try_from(info.len()).map_err(io::Error::other)?)
        .u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD)?;
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    if word(0) != BPF_LINK_TYPE_TCX {
        return Err(io::Error::other(format!(
            "{} is a link of type {}, not a TCX link",
            pin.display(),
            word(0)
        )));
    }
    let hook = match word(20) {
        BPF_TCX_INGRESS => Some(Hook::FromPod),
        BPF_TCX_EGRESS => Some(Hook::ToPod),
        _ => None,
    };
    Ok(PinnedTcx {
        ifindex: word(16),
        hook,
        prog_id: word(8),
    })
}
