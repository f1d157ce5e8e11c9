//! Once the programs are loaded and attached and the sockets bound, the agent gives up every
//! capability but the two its work from then on needs: `CAP_BPF` (every `bpf()` call, map
//! reads and writes included, when unprivileged BPF is disabled) and `CAP_NET_ADMIN`
//! (attaching the programs to the interfaces of pods that appear later). The bounding set is
//! reduced too, and `no_new_privs` set, so no exec can regain them.
//!
//! Capabilities belong to threads, not processes: the thread that asks drops at once, every
//! worker is made to drop by a task that holds it until all have (see [`drop_all`]), and any
//! thread the runtime starts later drops before it runs anything (its start hook calls
//! [`on_thread_wake`], as does its unpark hook).

use std::{
    cell::Cell,
    io,
    sync::atomic::{AtomicBool, Ordering},
};

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_BPF: u32 = 39;

/// What the agent keeps.
pub const KEEP: [u32; 2] = [CAP_NET_ADMIN, CAP_BPF];

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The runtime's worker threads.
pub const WORKERS: usize = 2;

static REQUESTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static DROPPED: Cell<bool> = const { Cell::new(false) };
}

fn keep_mask() -> u64 {
    KEEP.iter().fold(0, |m, c| m | 1 << c)
}

fn get() -> io::Result<[Data; 2]> {
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) with a v3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

/// The calling thread's effective set, as a bit mask.
pub fn effective() -> io::Result<u64> {
    let d = get()?;
    Ok(u64::from(d[0].effective) | u64::from(d[1].effective) << 32)
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops the calling thread's capabilities to [`KEEP`].
fn drop_this_thread() -> io::Result<()> {
    let keep = keep_mask();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let d = get()?;
    if d[0].effective & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap() {
            if keep & (1 << cap) == 0 {
                // SAFETY: prctl(2) with integer arguments.
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) }
                    != 0
                {
                    let e = io::Error::last_os_error();
                    // EINVAL: a capability this kernel does not know.
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(e);
                    }
                }
            }
        }
    }
    let mut data = [Data::default(); 2];
    for (i, word) in data.iter_mut().enumerate() {
        let permitted = u64::from(d[i].permitted) << (32 * i);
        let kept = ((permitted & keep) >> (32 * i)) as u32;
        *word = Data {
            effective: kept,
            permitted: kept,
            inheritable: 0,
        };
    }
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: capset(2) with a v3 header and its two data words; lowering is always allowed.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(2) with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    DROPPED.set(true);
    Ok(())
}

/// Drops capabilities on this thread and on each of the runtime's `workers` threads.
pub async fn drop_all(workers: usize) -> io::Result<()> {
    REQUESTED.store(true, Ordering::SeqCst);
    drop_this_thread()?;
    // One task per worker, each holding its worker until all have dropped (bounded), so that
    // no two land on the same one.
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let result = if DROPPED.get() {
                    Ok(())
                } else {
                    drop_this_thread()
                };
                arrived.fetch_add(1, Ordering::SeqCst);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
                while arrived.load(Ordering::SeqCst) < workers
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                result
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok(())
}

/// The runtime's thread start and unpark hook.
pub fn on_thread_wake() {
    if REQUESTED.load(Ordering::Relaxed)
        && !DROPPED.get()
        && let Err(e) = drop_this_thread()
    {
        tracing::error!(error = %e, "cannot drop capabilities on a runtime thread");
        // Do not try again on every wake-up.
        DROPPED.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_only_bpf_and_net_admin() {
        // On a thread of its own: the test harness's other threads keep theirs.
        std::thread::spawn(|| {
            drop_this_thread().unwrap();
            let eff = effective().unwrap();
            assert_eq!(eff & !keep_mask(), 0, "kept {eff:#x}");
        })
        .join()
        .unwrap();
    }
}
