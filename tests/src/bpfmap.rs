//! The `bpf(2)` commands that measurements and tests need, without bpftool (one `bpftool`
//! process per lookup costs milliseconds, too much for a map polled every few hundred
//! microseconds): open a pin (`BPF_OBJ_GET`), learn a map's key and value sizes
//! (`BPF_OBJ_GET_INFO_BY_FD`) and look a key up (`BPF_MAP_LOOKUP_ELEM`, per-CPU maps too),
//! follow a pinned link to its program (`BPF_OBJ_GET_INFO_BY_FD`, `BPF_PROG_GET_FD_BY_ID`),
//! and run a program on a packet in the kernel (`BPF_PROG_TEST_RUN`). For the tests that put
//! programs of their own next to ours, as a CNI does: create an array map
//! (`BPF_MAP_CREATE`), load a tc program from raw instructions (`BPF_PROG_LOAD`), attach it
//! with a TCX link first or last on an interface (`BPF_LINK_CREATE`), and list an interface's
//! TCX chain in order (`BPF_PROG_QUERY`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// With `relative_fd` 0: ahead of every program on the hook.
const BPF_F_BEFORE: u32 = 1 << 3;
/// With `relative_fd` 0: behind every program on the hook.
const BPF_F_AFTER: u32 = 1 << 4;
/// `src_reg` of a `BPF_LD | BPF_IMM | BPF_DW` whose immediate is a map's descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// tc verdicts as TCX programs return them: `TCX_NEXT` (-1, `TC_ACT_UNSPEC`) hands the
/// packet to the next program of the chain (after the last one, the kernel passes it),
/// `TC_ACT_OK` passes it and ends the chain, `TC_ACT_SHOT` drops it.
pub const TCX_NEXT: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// `sizeof(struct __sk_buff)` (UAPI, kernel 6.18): a test run's context.
const SK_BUFF_SIZE: usize = 192;
/// The offset of `__sk_buff.ifindex`.
const SK_BUFF_IFINDEX: usize = 40;

/// `union bpf_attr`, as large as the kernel's (it zero-checks what it does not know); each
/// command fills the leading fields of its own struct and leaves the rest zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    /// The `u32` at `at` (an output field, after the call).
    fn u32_at(&self, at: usize) -> u32 {
        u32_in(&self.0, at)
    }

    /// Runs `bpf(cmd, self)`: the syscall's result (a file descriptor or 0).
    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<libc::c_long> {
        // SAFETY: `self` is a zero-initialised `bpf_attr` of the size passed, whose pointer
        // fields (set by the callers) point to buffers that outlive the call and are as large
        // as the kernel will access for this command.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                std::mem::size_of::<Self>(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

fn fd_of(r: libc::c_long) -> Result<OwnedFd> {
    let raw = i32::try_from(r).context("bpf(2) returned no file descriptor")?;
    // SAFETY: the kernel just returned this new descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn raw_u32(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are non-negative")
}

/// The native-endian `u32` at `at` in `b`.
fn u32_in(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// `BPF_OBJ_GET`: a descriptor for the object pinned at `path` (flags 0 ask for read-write,
/// which root has).
fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).context("a path without NUL")?;
    fd_of(
        Attr::new()
            .put_u64(0, c.as_ptr() as u64)
            .call(BPF_OBJ_GET)
            .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?,
    )
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (the leading bytes of the object's info struct).
fn obj_info(fd: &OwnedFd, info: &mut [u8]) -> Result<()> {
    Attr::new()
        .put_u32(0, raw_u32(fd))
        .put_u32(4, u32::try_from(info.len()).context("info size")?)
        .put_u64(8, info.as_mut_ptr() as u64)
        .call(BPF_OBJ_GET_INFO_BY_FD)
        .context("BPF_OBJ_GET_INFO_BY_FD")
        .map(drop)
}

/// An open pinned map, or a map of the caller's own ([`PinnedMap::new_array`]).
pub struct PinnedMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
    /// For a per-CPU map, the number of possible CPUs: a lookup returns one value for each,
    /// padded to 8 bytes.
    cpus: Option<usize>,
}

impl PinnedMap {
    /// Opens the map pinned at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let fd = obj_get(path)?;
        // struct bpf_map_info: type, id, key_size, value_size, ... (u32 each).
        let mut info = [0u8; 80];
        obj_info(&fd, &mut info).with_context(|| format!("map info of {}", path.display()))?;
        let per_cpu = matches!(
            u32_in(&info, 0),
            BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH
        );
        Ok(Self {
            fd,
            key_size: u32_in(&info, 8) as usize,
            value_size: u32_in(&info, 12) as usize,
            cpus: if per_cpu {
                Some(possible_cpus()?)
            } else {
                None
            },
        })
    }

    /// A new array map (not pinned) of `entries` `u64` values under `u32` keys, all 0: a
    /// test program's counters. It goes when the last descriptor does (this one and the
    /// programs that use it).
    pub fn new_array(entries: u32) -> Result<Self> {
        let fd = fd_of(
            Attr::new()
                .put_u32(0, BPF_MAP_TYPE_ARRAY)
                .put_u32(4, 4)
                .put_u32(8, 8)
                .put_u32(12, entries)
                .call(BPF_MAP_CREATE)
                .context("BPF_MAP_CREATE of an array")?,
        )?;
        Ok(Self {
            fd,
            key_size: 4,
            value_size: 8,
            cpus: None,
        })
    }

    /// The `u64` under `index` of an array of `u64` (not per-CPU).
    pub fn u64_at(&self, index: u32) -> Result<u64> {
        if self.cpus.is_some() || self.value_size != 8 {
            bail!("not an array of u64");
        }
        let v = self
            .lookup(&index.to_ne_bytes())?
            .with_context(|| format!("no slot {index}"))?;
        Ok(u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")))
    }

    /// The size of a key, in bytes.
    pub fn key_size(&self) -> usize {
        self.key_size
    }

    /// The size of a value (one CPU's, in a per-CPU map), in bytes.
    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// The value stored under `key` (for a per-CPU map, every possible CPU's, each padded to
    /// 8 bytes), or `None` when the map has no such key.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if key.len() != self.key_size {
            bail!(
                "a key of {} bytes for a map with {}-byte keys",
                key.len(),
                self.key_size
            );
        }
        let size = match self.cpus {
            Some(cpus) => self.value_size.div_ceil(8) * 8 * cpus,
            None => self.value_size,
        };
        let mut value = vec![0u8; size.max(1)];
        let r = Attr::new()
            .put_u32(0, raw_u32(&self.fd))
            .put_u64(8, key.as_ptr() as u64)
            .put_u64(16, value.as_mut_ptr() as u64)
            .call(BPF_MAP_LOOKUP_ELEM);
        match r {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
        }
    }

    /// Whether the map holds `key`.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.lookup(key)?.is_some())
    }

    /// The value of type `T` (an ABI type of `portcullis_common`) under `key`, or `None`.
    pub fn get<T: Plain>(&self, key: &[u8]) -> Result<Option<T>> {
        self.lookup(key)?.map(|v| T::read(&v)).transpose()
    }

    /// The sum over CPUs of the `u64` under `index` of a per-CPU array.
    pub fn per_cpu_sum(&self, index: u32) -> Result<u64> {
        if self.cpus.is_none() || self.value_size != 8 {
            bail!("not a per-CPU array of u64");
        }
        let v = self
            .lookup(&index.to_ne_bytes())?
            .with_context(|| format!("no slot {index}"))?;
        Ok(v.as_chunks::<8>()
            .0
            .iter()
            .map(|c| u64::from_ne_bytes(*c))
            .sum())
    }
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, such as `0-1`), which
/// sizes per-CPU values.
fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
        n += hi - lo + 1;
    }
    Ok(n)
}

/// A loaded program: opened through the link it is attached with, or loaded by a test from
/// raw instructions ([`PinnedProg::load_sched_cls`]).
pub struct PinnedProg {
    fd: OwnedFd,
    /// The program's id.
    pub id: u32,
    /// The program's name (as the kernel keeps it: at most 15 bytes).
    pub name: String,
}

/// What one `BPF_PROG_TEST_RUN` reported.
pub struct TestRun {
    /// The program's return value (of the last run): a tc verdict such as [`TCX_NEXT`].
    pub retval: i32,
    /// Average nanoseconds per run, as the kernel timed them.
    pub duration_ns: u32,
    /// The packet after the (last) run, when an output buffer was asked for.
    pub data_out: Vec<u8>,
}

impl PinnedProg {
    /// The program inside the link pinned at `path` (link info → program id → a descriptor).
    pub fn from_link_pin(path: &Path) -> Result<Self> {
        let link = obj_get(path)?;
        // struct bpf_link_info: type, id, prog_id (u32 each), then a union.
        let mut li = [0u8; 64];
        obj_info(&link, &mut li).with_context(|| format!("link info of {}", path.display()))?;
        let id = u32_in(&li, 8);
        if id == 0 {
            bail!("the link pinned at {} holds no program", path.display());
        }
        let fd = fd_of(
            Attr::new()
                .put_u32(0, id)
                .call(BPF_PROG_GET_FD_BY_ID)
                .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?,
        )?;
        // struct bpf_prog_info: the name (16 bytes, NUL-padded) is at offset 64.
        let mut pi = [0u8; 80];
        obj_info(&fd, &mut pi).with_context(|| format!("program info of id {id}"))?;
        let name = pi[64..80]
            .iter()
            .take_while(|b| **b != 0)
            .map(|b| char::from(*b))
            .collect();
        Ok(Self { fd, id, name })
    }

    /// `BPF_PROG_TEST_RUN`: runs the program `repeat` times on `frame` (an Ethernet frame) as
    /// a packet of interface `ifindex` (`__sk_buff.ifindex`, looked up in the calling
    /// thread's network namespace). With `out`, the packet after the last run is returned
    /// (up to that many bytes).
    pub fn test_run(&self, frame: &[u8], ifindex: u32, repeat: u32, out: usize) -> Result<TestRun> {
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut data_out = vec![0u8; out];
        let mut a = Attr::new();
        a.put_u32(0, raw_u32(&self.fd))
            .put_u32(8, u32::try_from(frame.len()).context("frame size")?)
            .put_u64(16, frame.as_ptr() as u64)
            .put_u32(32, repeat)
            .put_u32(40, SK_BUFF_SIZE as u32)
            .put_u64(48, ctx.as_ptr() as u64);
        if out > 0 {
            a.put_u32(12, u32::try_from(out).context("output size")?)
                .put_u64(24, data_out.as_mut_ptr() as u64);
        }
        a.call(BPF_PROG_TEST_RUN)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {} (id {})", self.name, self.id))?;
        data_out.truncate(a.u32_at(12) as usize);
        Ok(TestRun {
            retval: a.u32_at(4).cast_signed(),
            duration_ns: a.u32_at(36),
            data_out,
        })
    }
}

impl PinnedProg {
    /// `BPF_PROG_LOAD`: a tc (`BPF_PROG_TYPE_SCHED_CLS`) program of the caller's own, from raw
    /// instructions, named `name` (at most 15 bytes). It is unloaded when this descriptor and
    /// every link holding it are gone. A program the verifier rejects is an error quoting the
    /// verifier's log.
    pub fn load_sched_cls(name: &str, insns: &[Insn]) -> Result<Self> {
        if name.len() > 15 {
            bail!("program name {name:?} is longer than 15 bytes");
        }
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 20];
        let load = |log: Option<&mut [u8]>| -> std::io::Result<libc::c_long> {
            let mut a = Attr::new();
            a.put_u32(0, BPF_PROG_TYPE_SCHED_CLS)
                .put_u32(
                    4,
                    u32::try_from(insns.len()).map_err(std::io::Error::other)?,
                )
                .put_u64(8, insns.as_ptr() as u64)
                .put_u64(16, license.as_ptr() as u64);
            if let Some(log) = log {
                a.put_u32(24, 1)
                    .put_u32(28, u32::try_from(log.len()).map_err(std::io::Error::other)?)
                    .put_u64(32, log.as_mut_ptr() as u64);
            }
            // prog_name, after log_level, log_size, log_buf, kern_version and prog_flags.
            a.0[48..48 + name.len()].copy_from_slice(name.as_bytes());
            a.call(BPF_PROG_LOAD)
        };
        let r = match load(None) {
            Ok(r) => r,
            // Again with the verifier's log, to say why.
            Err(first) => load(Some(&mut log)).map_err(|_| {
                let text =
                    String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
                        .into_owned();
                anyhow::anyhow!("BPF_PROG_LOAD of {name}: {first}; the verifier said:\n{text}")
            })?,
        };
        let fd = fd_of(r)?;
        let mut pi = [0u8; 80];
        obj_info(&fd, &mut pi).with_context(|| format!("program info of {name}"))?;
        Ok(Self {
            fd,
            id: u32_in(&pi, 4),
            name: name.to_owned(),
        })
    }

    /// `BPF_LINK_CREATE`: attaches the program with a TCX link at `hook` of interface
    /// `ifindex`, looked up in the calling thread's network namespace (enter the node's
    /// first), first or last in the chain as `order` says. The link is not pinned: it is
    /// detached when the returned [`TcxLink`] is dropped.
    pub fn attach_tcx(&self, ifindex: u32, hook: TcxHook, order: TcxOrder) -> Result<TcxLink> {
        let flags = match order {
            TcxOrder::First => BPF_F_BEFORE,
            TcxOrder::Last => BPF_F_AFTER,
        };
        // relative_fd (offset 16) 0: relative to the whole chain.
        let fd = fd_of(
            Attr::new()
                .put_u32(0, raw_u32(&self.fd))
                .put_u32(4, ifindex)
                .put_u32(8, hook.attach_type())
                .put_u32(12, flags)
                .call(BPF_LINK_CREATE)
                .with_context(|| {
                    format!(
                        "BPF_LINK_CREATE of {} at {hook:?} of interface {ifindex} ({order:?})",
                        self.name
                    )
                })?,
        )?;
        // struct bpf_link_info: type, id, prog_id (u32 each), then a union.
        let mut li = [0u8; 64];
        obj_info(&fd, &mut li).context("link info")?;
        Ok(TcxLink {
            _fd: fd,
            id: u32_in(&li, 4),
        })
    }
}

/// A TCX hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcxHook {
    /// Packets the interface receives (on a pod's host-side veth: what the pod sends).
    Ingress,
    /// Packets the interface sends (on a pod's host-side veth: what goes into the pod).
    Egress,
}

impl TcxHook {
    fn attach_type(self) -> u32 {
        match self {
            Self::Ingress => BPF_TCX_INGRESS,
            Self::Egress => BPF_TCX_EGRESS,
        }
    }
}

/// Where a new TCX link goes in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcxOrder {
    /// Ahead of every program there (`BPF_F_BEFORE`, no relative program).
    First,
    /// Behind every program there (`BPF_F_AFTER`, no relative program).
    Last,
}

/// A TCX link of the caller's own, detached on drop (closing its only descriptor releases it).
pub struct TcxLink {
    _fd: OwnedFd,
    /// The link's id.
    pub id: u32,
}

/// `BPF_PROG_QUERY`: the ids of the programs attached with TCX at `hook` of interface
/// `ifindex` (looked up in the calling thread's network namespace), in the order they run.
pub fn tcx_chain(ifindex: u32, hook: TcxHook) -> Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = Attr::new();
    a.put_u32(0, ifindex)
        .put_u32(4, hook.attach_type())
        .put_u64(16, ids.as_mut_ptr() as u64)
        .put_u32(24, u32::try_from(ids.len()).context("id buffer")?);
    a.call(BPF_PROG_QUERY)
        .with_context(|| format!("BPF_PROG_QUERY of {hook:?} of interface {ifindex}"))?;
    ids.truncate(a.u32_at(24) as usize);
    Ok(ids)
}

/// One eBPF instruction (`struct bpf_insn`), for the tests' own programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// The destination register in the low nibble, the source in the high one.
    regs: u8,
    /// A jump's offset (in instructions, from the next one) or a memory access's.
    pub off: i16,
    imm: i32,
}

impl Insn {
    /// The instruction `code` (`BPF_ALU64 | BPF_MOV | BPF_K` and the like) with registers
    /// `dst` and `src` (0 to 10), offset `off` and immediate `imm`.
    pub fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        assert!(dst <= 10 && src <= 10, "registers are r0 to r10");
        Self {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        }
    }

    /// `dst = map` (`BPF_LD | BPF_IMM | BPF_DW` with `BPF_PSEUDO_MAP_FD`), two instructions:
    /// the kernel puts the map's address there at load time. `map` must outlive the load.
    pub fn ld_map(dst: u8, map: &PinnedMap) -> [Self; 2] {
        let fd = map.fd.as_raw_fd();
        [
            Self::new(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd),
            Self::new(0, 0, 0, 0, 0),
        ]
    }
}

/// The ABI types of `portcullis_common` as bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]` without implicit padding (the crate pins each size), and
/// valid for every bit pattern.
pub unsafe trait Plain: Copy {
    /// The value's bytes, as a map key or value.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Self` is plain old data without padding (the trait's contract), so all of
        // its `size_of` bytes are initialised.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(self).cast(), std::mem::size_of::<Self>())
        }
    }

    /// A value read from the leading bytes of `b`.
    fn read(b: &[u8]) -> Result<Self> {
        if b.len() < std::mem::size_of::<Self>() {
            bail!(
                "{} bytes for a value of {}",
                b.len(),
                std::mem::size_of::<Self>()
            );
        }
        // SAFETY: enough bytes (checked), and every bit pattern is a valid `Self`.
        Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) })
    }
}

// SAFETY: the map ABI of `portcullis_common`: `#[repr(C)]` integers and byte arrays, their
// sizes pinned there (no padding), every bit pattern a value.
unsafe impl Plain for portcullis_common::Endpoint {}
// SAFETY: as above.
unsafe impl Plain for portcullis_common::AuthKey {}
// SAFETY: as above.
unsafe impl Plain for portcullis_common::AuthValue {}
// SAFETY: as above.
unsafe impl Plain for portcullis_common::FlowKey {}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;

    /// Creates a map of type `kind` (for tests of this module), returning its descriptor.
    fn create(kind: u32, key_size: u32, value_size: u32, max_entries: u32) -> Result<OwnedFd> {
        fd_of(
            Attr::new()
                .put_u32(0, kind)
                .put_u32(4, key_size)
                .put_u32(8, value_size)
                .put_u32(12, max_entries)
                .call(BPF_MAP_CREATE)
                .context("BPF_MAP_CREATE")?,
        )
    }

    fn update(fd: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
        Attr::new()
            .put_u32(0, raw_u32(fd))
            .put_u64(8, key.as_ptr() as u64)
            .put_u64(16, value.as_ptr() as u64)
            .call(BPF_MAP_UPDATE_ELEM)
            .context("BPF_MAP_UPDATE_ELEM")
            .map(drop)
    }

    fn pin(fd: &OwnedFd, path: &Path) -> Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).context("a path without NUL")?;
        Attr::new()
            .put_u64(0, c.as_ptr() as u64)
            .put_u32(8, raw_u32(fd))
            .call(BPF_OBJ_PIN)
            .with_context(|| format!("BPF_OBJ_PIN {}", path.display()))
            .map(drop)
    }

    /// Removes the test's pin, also when an assertion fails.
    struct Pin(std::path::PathBuf);

    impl Drop for Pin {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A new map (see [`create`]) pinned as `portcullis-bpfmap-NAME-PID` in bpffs; needs root.
    fn pinned_map(
        kind: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
    ) -> (OwnedFd, Pin) {
        assert!(
            crate::process::is_root(),
            "the pinned-map tests create and pin BPF maps: run them as root"
        );
        crate::ensure_bpffs().expect("bpffs");
        let map = create(kind, key_size, value_size, max_entries).expect("a map");
        let pinned = Pin(std::path::PathBuf::from(format!(
            "{}/portcullis-bpfmap-{name}-{}",
            crate::info::BPFFS_ROOT,
            std::process::id()
        )));
        let _ = std::fs::remove_file(&pinned.0);
        pin(&map, &pinned.0).expect("pin");
        (map, pinned)
    }

    #[test]
    fn a_pinned_map_is_opened_and_looked_up_by_syscall() {
        let (map, pinned) = pinned_map(BPF_MAP_TYPE_HASH, 4, 16, 8, "test");
        let value: Vec<u8> = (1..=16).collect();
        update(&map, &[198, 19, 0, 1], &value).expect("update");
        drop(map);

        let m = PinnedMap::open(&pinned.0).expect("open the pin");
        assert_eq!((m.key_size(), m.value_size()), (4, 16));
        assert_eq!(m.lookup(&[198, 19, 0, 1]).expect("lookup"), Some(value));
        assert!(!m.contains(&[198, 19, 0, 2]).expect("lookup"));
        assert!(m.lookup(&[0; 16]).is_err(), "a key of the wrong size");
        assert!(PinnedMap::open(&pinned.0.with_extension("absent")).is_err());
        assert!(m.per_cpu_sum(0).is_err(), "not a per-CPU map");
    }

    #[test]
    fn a_per_cpu_array_is_looked_up_for_every_cpu() {
        let (map, pinned) = pinned_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2, "percpu-test");
        let cpus = possible_cpus().expect("possible CPUs");
        let values: Vec<u8> = (1..=cpus as u64).flat_map(u64::to_ne_bytes).collect();
        update(&map, &1u32.to_ne_bytes(), &values).expect("update");
        drop(map);

        let m = PinnedMap::open(&pinned.0).expect("open the pin");
        assert_eq!((m.key_size(), m.value_size()), (4, 8));
        assert_eq!(m.lookup(&1u32.to_ne_bytes()).expect("lookup"), Some(values));
        let n = cpus as u64;
        assert_eq!(m.per_cpu_sum(1).expect("slot 1"), n * (n + 1) / 2);
        assert_eq!(m.per_cpu_sum(0).expect("slot 0"), 0);
        assert!(m.per_cpu_sum(2).is_err(), "past the array");
    }
}
