//! The vhost-user side: one virtio-blk device, one worker thread per queue
//! (vhost-user-backend's epoll threads), each with its [`Engine`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vhost_user_process::vring::TolerantVring;
use viommu_backend::{Dma, RingAddrs};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::BlkConfig;
use crate::engine::{Engine, QueueSetup, Resume, Shared};
use crate::features::{VIRTIO_RING_F_EVENT_IDX, bit, offered_features};

pub use vhost_user_process::vring::GuestMem;

struct Inner {
    shared: Arc<Shared>,
    dma: Dma,
    offered: u64,
    config: Mutex<BlkConfig>,
    engines: Vec<Mutex<Engine>>,
    /// Each queue's vring as its thread last saw it (to complete I/O in
    /// flight when the VMM stops the queue).
    vrings: Vec<Mutex<Option<VringRwLock>>>,
    queue_size: u16,
    event_idx: AtomicBool,
}

/// The virtio-blk device; cheap to clone (clones share it). It outlives
/// VMM connections: its engines, rings and daemon connection are made once.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A queue's engine.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The disk's description.
    #[error("disk")]
    Disk(#[from] crate::disk::DiskError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BlkBackend {
    /// A device of `queues` queues of `queue_size` entries over `shared`'s
    /// disk, with DMA through `dma`.
    pub fn new(
        shared: Arc<Shared>,
        dma: Dma,
        queues: u16,
        queue_size: u16,
        seg_max: u32,
        size_max: u32,
    ) -> Result<BlkBackend, BackendError> {
        shared.target.disk.validate()?;
        let offered =
            offered_features(&shared.target.disk, dma.translates()) | bit(VIRTIO_RING_F_EVENT_IDX);
        let config = BlkConfig::new(&shared.target.disk, queues, seg_max, size_max);
        let engines = (0..usize::from(queues))
            .map(|i| Engine::new(i, queue_size, Arc::clone(&shared), &dma).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let vrings = (0..usize::from(queues)).map(|_| Mutex::new(None)).collect();
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                shared,
                dma,
                offered,
                config: Mutex::new(config),
                engines,
                vrings,
                queue_size,
                event_idx: AtomicBool::new(false),
            }),
        })
    }

    /// The completion eventfd of queue `i` (its thread must watch it).
    pub fn completion_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        self.inner.engines.get(i).map(|e| lock(e).completion_fd())
    }

    /// Listener ID of the completion eventfds (above every queue index).
    pub fn completion_event(&self) -> u64 {
        self.inner.engines.len() as u64 + 1
    }

    /// Stops every queue (their I/O completed) and forgets their set-up;
    /// the device is ready for the next VMM connection.
    pub fn quiesce(&self) {
        for i in 0..self.inner.engines.len() {
            self.stop_queue(i);
        }
    }

    /// Waits for queue `index`'s I/O in flight, completes it in the vring
    /// the queue's thread last used, and forgets the queue's set-up.
    fn stop_queue(&self, index: usize) {
        let Some(engine) = self.inner.engines.get(index) else {
            return;
        };
        let vring = lock(&self.inner.vrings[index]).take();
        let mut engine = lock(engine);
        match vring {
            Some(vring) => {
                let setup = self.setup(&vring);
                let mut signal = || {
                    let _ = vring.signal_used_queue();
                };
                let resume = engine.stop(&setup, &mut signal);
                Self::write_back(&vring, resume);
            }
            None => {
                engine.stop(&dummy_setup(), &mut || ());
            }
        }
    }

    /// Per-queue counters, for logs.
    pub fn stats(&self) -> Vec<crate::engine::EngineStats> {
        self.inner.engines.iter().map(|e| lock(e).stats()).collect()
    }

    /// DMA faults met.
    pub fn faults(&self) -> u64 {
        self.inner.dma.faults()
    }

    /// Message mode: (IOTLB misses, invalidations) so far.
    pub fn iotlb_counters(&self) -> (u64, u64) {
        self.inner.dma.iotlb_counters()
    }

    fn setup(&self, vring: &VringRwLock) -> QueueSetup {
        let state = vring.get_ref();
        let q = state.get_queue();
        QueueSetup {
            addrs: RingAddrs {
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            },
            next_avail: q.next_avail(),
            event_idx: self.inner.event_idx.load(Ordering::Relaxed),
        }
    }

    fn write_back(vring: &VringRwLock, r: Resume) {
        if let Some(a) = r.next_avail {
            vring.set_queue_next_avail(a);
        }
    }

    fn serve(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let engine = self
            .inner
            .engines
            .get(index)
            .ok_or_else(|| io::Error::other(format!("no queue {index}")))?;
        // A queue stopped by GET_VRING_BASE (its I/O drained there) waits
        // for its next start; a late wake-up must not set it up again from
        // the old addresses.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        {
            let mut seen = lock(&self.inner.vrings[index]);
            if seen.is_none() {
                *seen = Some(vring.clone());
            }
        }
        let setup = self.setup(vring);
        let mut signal = || {
            if let Err(e) = vring.signal_used_queue() {
                warn!(queue = index, error = %e, "cannot notify the driver");
            }
        };
        let resume = lock(engine).run(&setup, &mut signal);
        Self::write_back(vring, resume);
        Ok(())
    }
}

/// A set-up that matches no real queue (used when stopping).
fn dummy_setup() -> QueueSetup {
    QueueSetup {
        addrs: RingAddrs {
            size: 0,
            desc: 0,
            avail: 0,
            used: 0,
        },
        next_avail: 0,
        event_idx: false,
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = TolerantVring;

    fn num_queues(&self) -> usize {
        self.inner.engines.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.offered | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.inner
            .shared
            .negotiated
            .store(features, Ordering::Relaxed);
        let mut config = lock(&self.inner.config);
        config.features_negotiated(features);
        self.inner
            .shared
            .writeback
            .store(config.writeback, Ordering::Relaxed);
        info!(
            features = format_args!("{features:#x}"),
            "driver acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ and REPLY_ACK: QEMU wants both for iommu_platform=on.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.quiesce();
        info!("device reset");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        lock(&self.inner.config).read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let negotiated = self.inner.shared.negotiated.load(Ordering::Relaxed);
        let mut config = lock(&self.inner.config);
        match config.write(offset, buf, negotiated) {
            Ok(()) => {
                self.inner
                    .shared
                    .writeback
                    .store(config.writeback, Ordering::Relaxed);
                info!(
                    writeback = config.writeback,
                    "write cache changed by the driver"
                );
            }
            // A refused write is the guest's doing: it changes nothing and
            // must not end the connection (an error here would).
            Err(e) => warn!(error = %e, offset, len = buf.len(), "config write refused"),
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.inner.dma.set_memory(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.engines.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.stop_queue(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[TolerantVring],
        thread_id: usize,
    ) -> io::Result<()> {
        let vring = vrings
            .first()
            .map(TolerantVring::rwlock)
            .ok_or_else(|| io::Error::other("no vring for this thread"))?;
        let _ = device_event; // a kick (0) or an I/O completion: same work
        self.serve(thread_id, vring)
    }
}
