//! Lookups in a pinned BPF map through the `bpf(2)` syscall, for measurements that poll a map
//! every few hundred microseconds (one `bpftool` process per lookup costs milliseconds).
//!
//! Only what polling needs: open a pin (`BPF_OBJ_GET`), learn its key and value sizes
//! (`BPF_OBJ_GET_INFO_BY_FD`) and look a key up (`BPF_MAP_LOOKUP_ELEM`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

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

/// An open pinned map.
pub struct PinnedMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl PinnedMap {
    /// Opens the map pinned at `path` (read-only is enough for lookups, but `BPF_OBJ_GET`
    /// with flags 0 asks for read-write, which root has).
    pub fn open(path: &Path) -> Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes()).context("a path without NUL")?;
        let fd = fd_of(
            Attr::new()
                .put_u64(0, c.as_ptr() as u64)
                .call(BPF_OBJ_GET)
                .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?,
        )?;
        // struct bpf_map_info: type, id, key_size, value_size, ... (u32 each).
        let mut info = [0u8; 80];
        Attr::new()
            .put_u32(0, raw_u32(&fd))
            .put_u32(4, info.len() as u32)
            .put_u64(8, info.as_mut_ptr() as u64)
            .call(BPF_OBJ_GET_INFO_BY_FD)
            .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD {}", path.display()))?;
        let field = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().expect("4"));
        Ok(Self {
            fd,
            key_size: field(2) as usize,
            value_size: field(3) as usize,
        })
    }

    pub fn key_size(&self) -> usize {
        self.key_size
    }

    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// The value stored under `key`, or `None` when the map has no such key.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if key.len() != self.key_size {
            bail!(
                "a key of {} bytes for a map with {}-byte keys",
                key.len(),
                self.key_size
            );
        }
        let mut value = vec![0u8; self.value_size.max(1)];
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;

    /// Creates a hash map (for tests of this module), returning its descriptor.
    fn create_hash(key_size: u32, value_size: u32, max_entries: u32) -> Result<OwnedFd> {
        fd_of(
            Attr::new()
                .put_u32(0, BPF_MAP_TYPE_HASH)
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

    #[test]
    fn a_pinned_map_is_opened_and_looked_up_by_syscall() {
        assert!(
            crate::process::is_root(),
            "the pinned-map test creates and pins a BPF map: run it as root"
        );
        crate::ensure_bpffs().expect("bpffs");
        let map = create_hash(4, 16, 8).expect("a map");
        let pinned = Pin(std::path::PathBuf::from(format!(
            "{}/portcullis-bpfmap-test-{}",
            crate::info::BPFFS_ROOT,
            std::process::id()
        )));
        let _ = std::fs::remove_file(&pinned.0);
        pin(&map, &pinned.0).expect("pin");
        let value: Vec<u8> = (1..=16).collect();
        update(&map, &[198, 19, 0, 1], &value).expect("update");
        drop(map);

        let m = PinnedMap::open(&pinned.0).expect("open the pin");
        assert_eq!((m.key_size(), m.value_size()), (4, 16));
        assert_eq!(m.lookup(&[198, 19, 0, 1]).expect("lookup"), Some(value));
        assert!(!m.contains(&[198, 19, 0, 2]).expect("lookup"));
        assert!(m.lookup(&[0; 16]).is_err(), "a key of the wrong size");
        assert!(PinnedMap::open(&pinned.0.with_extension("absent")).is_err());
    }
}
