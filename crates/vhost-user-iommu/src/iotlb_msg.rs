//! Message mode, the baseline backends are measured against: a backend that
//! keeps a private IOTLB (as DPDK's vhost and the kernel's vhost do with
//! QEMU's IOTLB messages) subscribes on the backend socket; it asks for a
//! translation on every miss (answered under the device lock, so an answer
//! always precedes the invalidation of what it answered), and each
//! revocation sends it an invalidation that must be acknowledged before the
//! request completes.
//!
//! The acknowledgements are waited for *without* the device lock held
//! ([`AckWait`]), since a backend may need a miss answered before it can
//! finish the I/O that holds its acknowledgement back.

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iotlb_shm::backend_proto::{self, ALL_ENDPOINTS, Message};
use iotlb_shm::{ReaderId, StallPolicy};
use tracing::{error, info, warn};

/// A revocation to tell message-mode backends about: `endpoint` (or
/// [`ALL_ENDPOINTS`]) loses `[first, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidation {
    /// Endpoint ID or [`ALL_ENDPOINTS`].
    pub endpoint: u32,
    /// First IOVA.
    pub first: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl Invalidation {
    /// Everything of every endpoint (resets, destroyed domains).
    pub const ALL: Invalidation = Invalidation {
        endpoint: ALL_ENDPOINTS,
        first: 0,
        last: u64::MAX,
    };
}

#[derive(Debug)]
struct Subscriber {
    id: ReaderId,
    pid: i32,
    stream: UnixStream,
    pidfd: Option<OwnedFd>,
    pending: HashSet<u64>,
    killed: bool,
}

#[derive(Debug, Default)]
struct State {
    subs: Vec<Subscriber>,
    next_cookie: u64,
}

/// The message-mode backends connected now; cheap to clone.
#[derive(Debug, Clone)]
pub struct Subscribers {
    state: Arc<(Mutex<State>, Condvar)>,
    stall: StallPolicy,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Subscribers {
    /// No subscriber yet; `stall` decides what happens to one that does
    /// not acknowledge.
    pub fn new(stall: StallPolicy) -> Subscribers {
        Subscribers {
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            stall,
        }
    }

    /// Adds a backend (its connection `stream`, for invalidations; its
    /// `pidfd`, for the stall policy).
    pub fn add(&self, id: ReaderId, pid: i32, stream: UnixStream, pidfd: Option<OwnedFd>) {
        // A stuck backend must not stall the daemon's sends forever.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        lock(&self.state.0).subs.push(Subscriber {
            id,
            pid,
            stream,
            pidfd,
            pending: HashSet::new(),
            killed: false,
        });
        info!(
            pid,
            reader = id.0,
            "backend in message mode: it gets an invalidation for every revocation"
        );
    }

    /// The backend's connection ended: nothing of it is waited for any
    /// more (message mode has no tracking of I/O after exit).
    pub fn remove(&self, id: ReaderId) {
        lock(&self.state.0).subs.retain(|s| s.id != id);
        self.state.1.notify_all();
    }

    /// The backend acknowledged invalidation `cookie`.
    pub fn ack(&self, id: ReaderId, cookie: u64) {
        if let Some(s) = lock(&self.state.0).subs.iter_mut().find(|s| s.id == id) {
            s.pending.remove(&cookie);
        }
        self.state.1.notify_all();
    }

    /// Whether any backend is in message mode.
    pub fn is_empty(&self) -> bool {
        lock(&self.state.0).subs.is_empty()
    }

    /// Sends `list` to every subscriber (one message per invalidation);
    /// returns what to wait for.
    pub fn invalidate(&self, list: &[Invalidation]) -> AckWait {
        let mut st = lock(&self.state.0);
        let State { subs, next_cookie } = &mut *st;
        let mut waiting = Vec::new();
        for s in subs.iter_mut() {
            for inv in list {
                *next_cookie += 1;
                let cookie = *next_cookie;
                let msg = Message::IotlbInvalidate {
                    cookie,
                    endpoint: inv.endpoint,
                    first: inv.first,
                    last: inv.last,
                }
                .encode();
                match backend_proto::send_with_fds(s.stream.as_fd(), &msg, &[]) {
                    Ok(()) => {
                        s.pending.insert(cookie);
                        waiting.push((s.id, cookie));
                    }
                    Err(e) => warn!(
                        pid = s.pid,
                        error = %e,
                        "cannot send an invalidation to a message-mode backend; waiting for it to leave"
                    ),
                }
            }
        }
        AckWait {
            subs: self.clone(),
            waiting,
        }
    }
}

/// Invalidations sent and not yet acknowledged.
#[derive(Debug)]
#[must_use = "wait for the acknowledgements before completing the request"]
pub struct AckWait {
    subs: Subscribers,
    waiting: Vec<(ReaderId, u64)>,
}

impl AckWait {
    /// Nothing to wait for.
    pub fn none(subs: &Subscribers) -> AckWait {
        AckWait {
            subs: subs.clone(),
            waiting: Vec::new(),
        }
    }

    /// Returns once every subscriber acknowledged (or left); applies the
    /// stall policy to one that does not.
    pub fn wait(self) {
        if self.waiting.is_empty() {
            return;
        }
        let (m, cv) = &*self.subs.state;
        let started = Instant::now();
        let mut warned = false;
        let mut st = lock(m);
        loop {
            let outstanding: Vec<&Subscriber> = st
                .subs
                .iter()
                .filter(|s| {
                    self.waiting
                        .iter()
                        .any(|(id, c)| *id == s.id && s.pending.contains(c))
                })
                .collect();
            if outstanding.is_empty() {
                return;
            }
            let elapsed = started.elapsed();
            if !warned && elapsed >= self.subs.stall.warn_after {
                warned = true;
                for s in &outstanding {
                    warn!(
                        pid = s.pid,
                        waited_ms = elapsed.as_millis() as u64,
                        "a message-mode backend has not acknowledged an invalidation (UNMAP/DETACH waits for it)"
                    );
                }
            }
            let to_kill: Vec<ReaderId> = match self.subs.stall.kill_after {
                Some(k) if elapsed >= k => outstanding
                    .iter()
                    .filter(|s| !s.killed)
                    .map(|s| s.id)
                    .collect(),
                _ => Vec::new(),
            };
            for id in to_kill {
                if let Some(s) = st.subs.iter_mut().find(|s| s.id == id) {
                    s.killed = true;
                    match s
                        .pidfd
                        .as_ref()
                        .map(|p| iotlb_shm::memfd::pidfd_kill(p.as_fd()))
                    {
                        Some(Ok(())) => error!(
                            pid = s.pid,
                            "killed a message-mode backend that did not acknowledge past --stall-kill-ms; waiting for its connection to end"
                        ),
                        Some(Err(e)) => {
                            error!(pid = s.pid, error = %e, "could not kill a message-mode backend; waiting for it")
                        }
                        None => {}
                    }
                }
            }
            st = cv
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
