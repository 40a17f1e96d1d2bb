//! Message mode (`iotlb-msg:SOCKET`), the baseline: a private IOTLB filled
//! by request/reply messages and emptied by the daemon's invalidations, as
//! DPDK's vhost and the kernel's vhost keep one with QEMU's IOTLB messages.
//!
//! - A miss sends IOTLB_MISS and waits for the answer, which the socket's
//!   reader thread inserts into the cache *before* it reads anything after
//!   it (so an invalidation that follows an answer always applies to it).
//! - Batches are read-side sections: an invalidation removes the entries,
//!   then waits for the batches that may have used them, then for the
//!   in-flight I/O holding overlapping ranges, and only then acknowledges
//!   (on a thread of its own, so answers to misses keep flowing meanwhile).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, mpsc};
use std::time::Duration;

use iotlb_shm::backend_proto::{self, ALL_ENDPOINTS, MAX_LEN, Message};
use iotlb_shm::{Access, Fault, FaultKind};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::error::DmaError;

/// Longest wait for the daemon's answer to a miss.
const MISS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the answer to DRIVER_RESTARTED.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

type Answer = Result<(), Fault>;

/// In-flight ranges (`[first, last]`), by hold ID.
#[derive(Debug, Default)]
struct Holds {
    ranges: HashMap<u64, (u64, u64)>,
    next: u64,
}

/// A backend's private IOTLB and its connection to the daemon.
#[derive(Debug)]
pub struct MsgIotlb {
    endpoint: u32,
    sock: UnixStream,
    send_lock: Mutex<()>,
    cache: RwLock<Iotlb>,
    /// Batches hold it for reading; an invalidation takes it for writing
    /// once, to wait for the batches that began before it.
    section: RwLock<()>,
    holds: Mutex<Holds>,
    holds_released: Condvar,
    waiting: Mutex<HashMap<u64, mpsc::Sender<Answer>>>,
    next_cookie: AtomicU64,
    alive: AtomicBool,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

fn perms(access: Access) -> Permissions {
    match (access.bits() & 1 != 0, access.bits() & 2 != 0) {
        (true, true) => Permissions::ReadWrite,
        (false, true) => Permissions::Write,
        _ => Permissions::Read,
    }
}

impl MsgIotlb {
    /// Subscribes `sock` (a connection that got WELCOME) to invalidations
    /// and starts its reader thread.
    pub fn start(sock: UnixStream, endpoint: u32) -> std::io::Result<Arc<MsgIotlb>> {
        let reader = sock.try_clone()?;
        let me = Arc::new(MsgIotlb {
            endpoint,
            sock,
            send_lock: Mutex::new(()),
            cache: RwLock::new(Iotlb::new()),
            section: RwLock::new(()),
            holds: Mutex::new(Holds::default()),
            holds_released: Condvar::new(),
            waiting: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        });
        let (inv_tx, inv_rx) = mpsc::channel::<(u64, u64, u64)>();
        let worker = Arc::clone(&me);
        std::thread::Builder::new()
            .name("iotlb-invalidate".into())
            .spawn(move || {
                for (cookie, first, last) in inv_rx {
                    worker.finish_invalidation(cookie, first, last);
                }
            })?;
        let r = Arc::clone(&me);
        std::thread::Builder::new()
            .name("iotlb-messages".into())
            .spawn(move || r.read_loop(&reader, &inv_tx))?;
        let (tx, rx) = mpsc::channel();
        let cookie = me.cookie();
        me.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, tx);
        me.send(&Message::IotlbSubscribe { cookie })?;
        match rx.recv_timeout(MISS_TIMEOUT) {
            Ok(Ok(())) => Ok(me),
            _ => Err(std::io::Error::other(
                "the daemon did not accept the IOTLB subscription",
            )),
        }
    }

    fn cookie(&self) -> u64 {
        self.next_cookie.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, msg: &Message) -> std::io::Result<()> {
        let _one = self
            .send_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        backend_proto::send_with_fds(self.sock.as_fd(), &msg.encode(), &[])
    }

    /// Misses resolved so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Invalidations applied so far.
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    fn read_loop(&self, sock: &UnixStream, invalidations: &mpsc::Sender<(u64, u64, u64)>) {
        let mut buf = [0u8; MAX_LEN];
        loop {
            let msg = match backend_proto::recv_message(sock.as_fd(), &mut buf) {
                Ok(Some((m, _))) => m,
                Ok(None) | Err(_) => break,
            };
            match msg {
                Message::IotlbUpdate {
                    cookie,
                    endpoint,
                    perm,
                    iova,
                    size,
                    gpa,
                } => {
                    if endpoint == self.endpoint && size > 0 {
                        let perm = Access::from_bits(perm).map_or(Permissions::Read, perms);
                        let _ = self
                            .cache
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .set_mapping(
                                GuestAddress(iova),
                                GuestAddress(gpa),
                                size as usize,
                                perm,
                            );
                    }
                    self.answer(cookie, Ok(()));
                }
                Message::IotlbFault { cookie, fault } => self.answer(cookie, Err(fault)),
                Message::Ack { cookie } => self.answer(cookie, Ok(())),
                Message::IotlbInvalidate {
                    cookie,
                    endpoint,
                    first,
                    last,
                } => {
                    if endpoint == ALL_ENDPOINTS || endpoint == self.endpoint {
                        let len = (last - first).saturating_add(1);
                        self.cache
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .invalidate_mapping(GuestAddress(first), len as usize);
                    }
                    self.invalidations.fetch_add(1, Ordering::Relaxed);
                    let _ = invalidations.send((cookie, first, last));
                }
                Message::Error {
                    cookie,
                    code,
                    reason,
                } => {
                    tracing::warn!(code, %reason, "the daemon refused a message");
                    self.answer(
                        cookie,
                        Err(Fault {
                            kind: FaultKind::Detached,
                            endpoint: self.endpoint,
                            iova: 0,
                            access: Access::READ,
                        }),
                    );
                }
                _ => {}
            }
        }
        // The daemon is gone: nothing translates any more.
        self.alive.store(false, Ordering::Release);
        self.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .invalidate_all();
        let waiting: Vec<_> = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(Fault {
                kind: FaultKind::Detached,
                endpoint: self.endpoint,
                iova: 0,
                access: Access::READ,
            }));
        }
    }

    fn answer(&self, cookie: u64, answer: Answer) {
        let tx = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cookie);
        if let Some(tx) = tx {
            let _ = tx.send(answer);
        }
    }

    /// After the entries are gone: waits for the batches that began before,
    /// then for the in-flight I/O overlapping the range, then acknowledges.
    fn finish_invalidation(&self, cookie: u64, first: u64, last: u64) {
        drop(self.section.write().unwrap_or_else(PoisonError::into_inner));
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        while holds.ranges.values().any(|&(f, l)| f <= last && first <= l) {
            holds = self
                .holds_released
                .wait(holds)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(holds);
        if let Err(e) = self.send(&Message::Ack { cookie }) {
            tracing::debug!(error = %e, "cannot acknowledge an invalidation");
        }
    }

    /// Enters a batch.
    pub fn section(&self) -> RwLockReadGuard<'_, ()> {
        self.section.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `piece(gpa, len)` for the translation of `[iova, iova + len)`,
    /// resolving misses with the daemon; fails before any call if any byte
    /// does not translate.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        pieces: &mut Vec<(u64, u64)>,
    ) -> Result<(), DmaError> {
        pieces.clear();
        let fault = |kind, at| Fault {
            kind,
            endpoint,
            iova: at,
            access,
        };
        if !self.alive.load(Ordering::Acquire) {
            return Err(fault(FaultKind::Detached, iova).into());
        }
        if endpoint != self.endpoint {
            return Err(fault(FaultKind::Domain, iova).into());
        }
        let end = iova
            .checked_add(len)
            .ok_or(fault(FaultKind::Mapping, iova))?;
        let mut at = iova;
        let mut tries = 0;
        while at < end {
            let found = {
                let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
                match Iotlb::lookup(
                    &*cache,
                    GuestAddress(at),
                    (end - at) as usize,
                    perms(access),
                ) {
                    Ok(it) => {
                        for r in it {
                            pieces.push((r.base.0, r.length as u64));
                        }
                        None
                    }
                    Err(fails) => Some(
                        fails
                            .misses
                            .iter()
                            .chain(fails.access_fails.iter())
                            .map(|r| r.base.0)
                            .min()
                            .unwrap_or(at),
                    ),
                }
            };
            match found {
                None => return Ok(()),
                Some(missing) => {
                    tries += 1;
                    if tries > 64 {
                        return Err(fault(FaultKind::Mapping, missing).into());
                    }
                    pieces.clear();
                    self.miss(missing, access)?;
                    at = iova;
                }
            }
        }
        Ok(())
    }

    /// Tells the daemon that the guest set one of the device's queues up
    /// anew, and waits for its answer. On this connection every message
    /// the daemon sends is read by the IOTLB's own thread, so the answer is
    /// awaited here, as a miss's is (`BackendClient::driver_restarted`
    /// would wait for an answer that thread takes).
    pub fn driver_restarted(&self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let cookie = self.cookie();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, tx);
        self.send(&Message::DriverRestarted {
            cookie,
            endpoint: self.endpoint,
        })?;
        // A reset waits for the daemon's grace periods and backends.
        match rx.recv_timeout(RESTART_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::other("the daemon refused it or is gone")),
            Err(_) => {
                self.answer(cookie, Ok(()));
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from the daemon",
                ))
            }
        }
    }

    /// One round trip: asks the daemon for the translation of `iova`.
    fn miss(&self, iova: u64, access: Access) -> Result<(), DmaError> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cookie = self.cookie();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, tx);
        let detached = || Fault {
            kind: FaultKind::Detached,
            endpoint: self.endpoint,
            iova,
            access,
        };
        self.send(&Message::IotlbMiss {
            cookie,
            endpoint: self.endpoint,
            access: access.bits(),
            iova,
        })
        .map_err(|_| DmaError::Fault(detached()))?;
        match rx.recv_timeout(MISS_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => Err(DmaError::Fault(f)),
            Err(_) => Err(DmaError::Fault(detached())),
        }
    }

    /// Holds `[first, last]` for in-flight I/O; see [`MsgHold`].
    pub fn hold(self: &Arc<Self>, ranges: &[(u64, u64)]) -> MsgHold {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        let ids = ranges
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(start, len)| {
                holds.next += 1;
                let id = holds.next;
                holds
                    .ranges
                    .insert(id, (start, start.saturating_add(len - 1)));
                id
            })
            .collect();
        MsgHold {
            iotlb: Arc::clone(self),
            ids,
        }
    }
}

/// In-flight ranges: invalidations overlapping them are acknowledged only
/// once it is dropped.
#[derive(Debug)]
pub struct MsgHold {
    iotlb: Arc<MsgIotlb>,
    ids: Vec<u64>,
}

impl Drop for MsgHold {
    fn drop(&mut self) {
        let mut holds = self
            .iotlb
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for id in &self.ids {
            holds.ranges.remove(id);
        }
        drop(holds);
        self.iotlb.holds_released.notify_all();
    }
}
