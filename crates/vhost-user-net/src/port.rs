//! One port of the switch: one VM's virtio-net device. Its VMM connection
//! comes and goes (the control plane, [`crate::backend`]); its transmit and
//! receive queues, while the guest runs them, are served by the polling
//! threads ([`crate::pmd`]), each queue behind its own lock (a polling
//! thread holds it for one burst).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use viommu_backend::{Dma, QueueDma, RingAddrs, SplitQueue};
use virtio_queue::QueueT;

use crate::config::NetConfig;
use crate::features::{VIRTIO_NET_F_MRG_RXBUF, bit};
use crate::fib::PortId;
use crate::stats::PortStats;

/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Control queue index.
pub const CTRLQ: usize = 2;
/// Queues of a port (one pair and the control queue).
pub const QUEUES: usize = 3;

/// A queue the guest runs.
pub struct LiveQueue {
    /// The device side of its rings.
    pub ring: SplitQueue,
    /// The framework's vring (notifications, enable state).
    pub vring: VringRwLock,
    /// The ring could not be read: the queue waits to be set up again.
    pub failed: bool,
    /// Notifications were turned off (polled queues).
    pub quiet: bool,
}

impl std::fmt::Debug for LiveQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQueue")
            .field("ring", &self.ring)
            .field("failed", &self.failed)
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

/// One queue's state.
#[derive(Debug)]
pub struct QueueState {
    /// Its translation handle (a session slot in table mode), kept across
    /// VMM connections.
    pub dma: QueueDma,
    /// Set while the guest runs the queue.
    pub live: Option<LiveQueue>,
    /// Where the queue stood when it was last stopped.
    last_stop: Option<(RingAddrs, u16)>,
}

impl QueueState {
    /// Marks the queue failed after a ring error, once, with a warning.
    pub fn fail(&mut self, port: &str, queue: usize, why: &str) {
        if let Some(live) = &mut self.live {
            if !live.failed {
                warn!(
                    port,
                    queue,
                    error = why,
                    "the queue stops until the driver sets it up again"
                );
            }
            live.failed = true;
        }
    }
}

/// A port.
#[derive(Debug)]
pub struct Port {
    /// Its index.
    pub id: PortId,
    /// Its socket, for logs.
    pub name: String,
    /// Its config space.
    pub config: NetConfig,
    /// Its DMA (translation mode, guest memory, daemon connection).
    pub dma: Dma,
    /// Receive, transmit and control queues.
    pub queues: [Mutex<QueueState>; QUEUES],
    /// Counters.
    pub stats: PortStats,
    /// Features the driver acked.
    pub negotiated: AtomicU64,
    /// EVENT_IDX negotiated (set before the queues start).
    pub event_idx: std::sync::atomic::AtomicBool,
}

/// Why a port could not be made.
#[derive(Debug, thiserror::Error)]
#[error("port {name}: claiming a translation slot for its queues")]
pub struct PortError {
    name: String,
    #[source]
    source: viommu_backend::SetupError,
}

/// Locks a queue (a poisoned lock is still used: its state is plain data).
pub fn lock(m: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Port {
    /// A port with its DMA set up.
    pub fn new(id: PortId, name: String, config: NetConfig, dma: Dma) -> Result<Port, PortError> {
        let queue = || -> Result<Mutex<QueueState>, PortError> {
            let q = dma.queue().map_err(|source| PortError {
                name: name.clone(),
                source,
            })?;
            Ok(Mutex::new(QueueState {
                dma: q,
                live: None,
                last_stop: None,
            }))
        };
        let queues = [queue()?, queue()?, queue()?];
        Ok(Port {
            id,
            name,
            config,
            dma,
            queues,
            stats: PortStats::default(),
            negotiated: AtomicU64::new(0),
            event_idx: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the driver merges receive buffers.
    pub fn mrg_rxbuf(&self) -> bool {
        self.negotiated.load(Ordering::Relaxed) & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Starts serving queue `index` from `vring` if the guest runs it and
    /// it is not served yet (or was set up at other addresses).
    pub fn attach(&self, index: usize, vring: &VringRwLock) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        let (addrs, next_avail) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if !queue.ready() || !state.is_enabled() {
                return;
            }
            (
                RingAddrs {
                    size: queue.size(),
                    desc: queue.desc_table(),
                    avail: queue.avail_ring(),
                    used: queue.used_ring(),
                },
                queue.next_avail(),
            )
        };
        let restarted = {
            let mut state = lock(q);
            if state.live.as_ref().is_some_and(|l| l.ring.addrs() == addrs) {
                return;
            }
            // A queue that comes back at other addresses, or at index 0
            // after it had moved, was set up anew by a driver starting over:
            // the IOMMU daemon hears of it before the queue's first DMA.
            state
                .last_stop
                .take()
                .is_some_and(|(a, avail)| a != addrs || (next_avail == 0 && avail != 0))
        };
        if restarted {
            info!(port = %self.name, queue = index, "the driver set the queue up anew");
            self.dma.driver_restarted();
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        match SplitQueue::new(addrs, next_avail, event_idx) {
            Ok(ring) => {
                let mut state = lock(q);
                // GET_VRING_BASE may have stopped the queue meanwhile (it
                // marks it not ready before it detaches it): a queue is
                // never served after its stop.
                let still = {
                    let s = vring.get_ref();
                    s.get_queue().ready() && s.is_enabled()
                };
                if !still {
                    return;
                }
                state.live = Some(LiveQueue {
                    ring,
                    vring: vring.clone(),
                    failed: false,
                    quiet: false,
                });
                info!(port = %self.name, queue = index, size = addrs.size, "queue started");
            }
            Err(e) => warn!(port = %self.name, queue = index, error = %e, "queue refused"),
        }
    }

    /// Stops serving queue `index` (GET_VRING_BASE, a reset, the VMM
    /// gone): no polling thread touches it once this returns; the
    /// framework is told where the queue stands.
    pub fn detach(&self, index: usize) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        let mut state = lock(q);
        if let Some(live) = state.live.take() {
            live.vring.set_queue_next_avail(live.ring.next_avail());
            state.last_stop = Some((live.ring.addrs(), live.ring.next_avail()));
        }
    }

    /// A ring the queue cannot reach: a fault goes to the guest's IOMMU;
    /// returns the reason, for the log.
    pub fn ring_unreachable(&self, e: &viommu_backend::RingError) -> String {
        if let viommu_backend::RingError::Memory(viommu_backend::DmaError::Fault(f)) = e {
            self.dma.report_fault(f);
        }
        vhost_user_process::report_line(e)
    }

    /// Stops every queue.
    pub fn detach_all(&self) {
        for i in 0..QUEUES {
            self.detach(i);
        }
    }
}

/// Notifies the driver of a queue (its call eventfd).
pub fn notify(port: &str, vring: &VringRwLock) {
    if let Err(e) = vring.signal_used_queue() {
        tracing::debug!(port, error = %e, "cannot notify the driver");
    }
}
