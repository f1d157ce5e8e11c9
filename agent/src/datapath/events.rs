//! What the kernel programs send the agent: ring-buffer records (events) and, when enabled,
//! their debug log (aya-log), each read on a task of its own.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use portcullis_common::Event;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

/// A ring-buffer record as the programs write it: `None` when it is too short to be an
/// [`Event`] (the kernel never writes one; the check is what makes the read sound).
#[must_use]
pub fn decode_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<Event>() bytes, `Event` is plain integers and
    // byte arrays (any bit pattern is a value), and read_unaligned assumes no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// Hands every event of `ring` to `tx`. Events the agent is too busy to take are counted in
/// `dropped` and logged at most once a second: a flood must not queue without bound.
pub async fn read_events(ring: RingBuf<MapData>, tx: mpsc::Sender<Event>, dropped: Arc<AtomicU64>) {
    // SAFETY: the ring buffer owns its descriptor and `fd` owns the ring buffer, so the
    // descriptor stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring buffer; no datapath events will be seen");
            return;
        }
    };
    let mut warned = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let mut unwarned = 0u64;
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "event ring buffer poll failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = decode_event(&item) else {
                tracing::warn!(len = item.len(), "short datapath event ignored");
                continue;
            };
            if tx.try_send(ev).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
                unwarned += 1;
                if warned.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        dropped = unwarned,
                        "agent busy: datapath events dropped since the last warning"
                    );
                    (warned, unwarned) = (Instant::now(), 0);
                }
            }
        }
        guard.clear_ready();
    }
}

/// Forwards the programs' aya-log records into the agent's log.
pub async fn forward_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: as for the event ring buffer: the logger owns its descriptor.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the datapath log");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
