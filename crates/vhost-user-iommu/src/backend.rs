//! The vhost-user backend: one virtio-iommu device for one VMM connection.

use crate::device_state::{self, Finished, Transfer};
use crate::eventq::{FaultQueue, FaultStats};
use crate::kick_loop::KickLoop;
use crate::publish::{Publishing, TablePublisher};
use crate::request_ring::{self, RequestRing};
use crate::reset_watch::{ResetReason, ResetWatch};
use crate::state_journal::{self, Resumed, StateJournal};
use crate::telemetry::Telemetry;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use vhost_user_process::vring::TolerantVring;
use viommu_core::Device;
use viommu_core::state::{self, Record};
use virtio_iommu_proto::config::CONFIG_LEN;
use virtio_iommu_proto::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_iommu_proto::{EVENT_QUEUE, FaultRecord, Features, NUM_QUEUES, REQUEST_QUEUE};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

pub use vhost_user_process::vring::GuestMem;

/// Listener ID of the fault wake-up eventfd (IDs up to the queue count are
/// the framework's).
pub const FAULT_WAKE_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Ring features the transport offers on top of the device's own.
const RING_FEATURES: u64 = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Whether `start..=end` lies inside one of `regions` (start, length).
fn input_range_in_one_region(start: u64, end: u64, regions: &[(u64, u64)]) -> bool {
    regions
        .iter()
        .any(|&(rs, len)| start >= rs && len > 0 && end <= rs.saturating_add(len - 1))
}

/// Which reset: a device reset keeps `bypass` (DEV-CFG-4), a system reset
/// restores its configured value (DEV-CFG-5).
#[derive(Clone, Copy)]
enum ResetKind {
    Device,
    System,
}

/// The device state a queue event works on, behind one lock.
struct DeviceState {
    device: Device,
    publisher: Box<dyn TablePublisher>,
    /// Reset detection for VMMs that send no RESET_DEVICE.
    watch: ResetWatch,
    /// Where every change is saved (`--state-dir`), if anywhere.
    journal: Option<StateJournal>,
}

struct Inner {
    state: Mutex<DeviceState>,
    /// The io_uring request-queue thread, when enabled.
    kick_loop: Mutex<Option<KickLoop>>,
    /// The framework's epoll handler, to take the kick eventfd out of it.
    epoll: Mutex<Option<Arc<VringEpollHandler<IommuBackend>>>>,
    mem: RwLock<Option<GuestMem>>,
    /// Bumped by every memory table, for the request ring to pick it up.
    mem_generation: AtomicU64,
    /// The request queue's ring state (its processing thread's alone).
    ring: Mutex<RequestRing>,
    queue_size: u16,
    faults: Mutex<FaultQueue>,
    fault_wake: EventFd,
    /// Queue events that failed (logged up to [`LOGGED_EVENT_ERRORS`]).
    event_errors: AtomicU64,
    /// The daemon's counters.
    telemetry: Arc<Telemetry>,
    /// A device-state transfer under way (migration).
    transfer: Mutex<Option<Transfer>>,
}

/// Failed queue events logged per connection; the rest are only counted,
/// so a guest that keeps breaking its rings cannot flood the log.
const LOGGED_EVENT_ERRORS: u64 = 8;

/// A virtio-iommu device served over vhost-user. Cheap to clone: clones
/// share the device.
#[derive(Clone)]
pub struct IommuBackend {
    inner: Arc<Inner>,
}

fn lock_error<T>(_: T) -> io::Error {
    io::Error::other("device state lock poisoned by an earlier panic")
}

impl IommuBackend {
    /// Serves `resumed.device` (a fresh one, or one rebuilt from a saved
    /// state), publishing its translations through `publisher`, saving
    /// its changes in `resumed.journal` and counting its work into
    /// `telemetry` (the daemon's, which outlives VMM connections).
    pub(crate) fn with_device(
        resumed: Resumed,
        queue_size: u16,
        poll: Duration,
        mut publisher: Box<dyn TablePublisher>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let Resumed {
            device,
            journal,
            applied,
            restored,
        } = resumed;
        let mut watch = ResetWatch::default();
        if restored {
            // Stopped since the last daemon ended: a guest that reads the
            // config space before the VMM starts the device again was
            // reset meanwhile.
            watch.request_queue_stopped_before_restart();
        }
        publisher.start(&device);
        let fault_wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot create the fault eventfd");
            std::process::exit(1)
        });
        let mut ring = RequestRing::new(poll);
        ring.resume_applied(applied);
        ring.count_into(Arc::clone(&telemetry));
        IommuBackend {
            inner: Arc::new(Inner {
                state: Mutex::new(DeviceState {
                    device,
                    publisher,
                    watch,
                    journal,
                }),
                kick_loop: Mutex::new(None),
                epoll: Mutex::new(None),
                mem: RwLock::new(None),
                mem_generation: AtomicU64::new(0),
                ring: Mutex::new(ring),
                telemetry,
                queue_size,
                faults: Mutex::new(FaultQueue::default()),
                fault_wake,
                event_errors: AtomicU64::new(0),
                transfer: Mutex::new(None),
            }),
        }
    }

    /// Replaces the device with `device` (a migrated state): the shared
    /// table is rebuilt for it and the journal starts from it.
    fn install(&self, device: Device, faults: Vec<FaultRecord>) -> io::Result<()> {
        let mut guard = self.state()?;
        let st = &mut *guard;
        let (domains, mappings) = (device.domain_count(), device.mapping_count());
        st.device = device;
        st.watch.reset();
        st.publisher.start(&st.device);
        if let Some(j) = st.journal.take() {
            st.journal = j.restart(&st.device);
        }
        drop(guard);
        let pending = faults.len();
        if let Ok(mut f) = self.inner.faults.lock() {
            f.clear();
            faults.into_iter().for_each(|r| f.push(r));
        }
        // The worker delivers them as soon as the driver has buffers.
        let _ = self.inner.fault_wake.write(1);
        info!(
            domains,
            mappings,
            pending_faults = pending,
            "device state loaded from the VMM (CHECK_DEVICE_STATE)"
        );
        Ok(())
    }

    /// Moves the request queue's kick path onto an io_uring thread (pinned
    /// to `cpu` if given). `handler` is the framework's epoll handler, from
    /// which the kick eventfd is taken. Call [`Self::shutdown`] when the
    /// connection ends.
    pub(crate) fn enable_kick_loop(
        &self,
        handler: Arc<VringEpollHandler<IommuBackend>>,
        cpu: Option<usize>,
    ) -> io::Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let serve = Box::new(move |vring: &VringRwLock| {
            let Some(inner) = weak.upgrade() else {
                return 0;
            };
            let backend = IommuBackend { inner };
            backend.process_request_queue(vring).unwrap_or_else(|e| {
                warn!(error = %e, "request queue processing failed");
                0
            })
        });
        let weak = Arc::downgrade(&self.inner);
        let pending = Box::new(move |vring: &VringRwLock| {
            weak.upgrade()
                .is_some_and(|inner| IommuBackend { inner }.has_requests(vring))
        });
        let lost_kicks = Arc::clone(&self.inner.telemetry);
        let kick_loop = KickLoop::start(serve, pending, cpu, lost_kicks)?;
        *self.inner.kick_loop.lock().map_err(lock_error)? = Some(kick_loop);
        *self.inner.epoll.lock().map_err(lock_error)? = Some(handler);
        Ok(())
    }

    /// Stops the io_uring thread and lets go of the framework's handler
    /// (which refers back to this backend).
    pub(crate) fn shutdown(&self) {
        if let Ok(mut k) = self.inner.kick_loop.lock() {
            if let Some(mut k) = k.take() {
                k.stop();
            }
        }
        if let Ok(mut e) = self.inner.epoll.lock() {
            e.take();
        }
    }

    /// With the io_uring loop on: takes the request queue's current kick
    /// eventfd out of the framework's epoll set, gives it to the loop, and
    /// asks for a pass. Returns false when the loop is off.
    fn hand_over_kick(&self, vring: &VringRwLock) -> io::Result<bool> {
        let kick_loop = self.inner.kick_loop.lock().map_err(lock_error)?;
        let Some(kick_loop) = kick_loop.as_ref() else {
            return Ok(false);
        };
        let handler = self.inner.epoll.lock().map_err(lock_error)?.clone();
        // The vring stays locked until the descriptor is duplicated: a
        // SET_VRING_KICK meanwhile would close it, and its number could
        // name another file (the next queue's eventfd) by then.
        let state = vring.get_ref();
        let raw = state.get_kick().as_ref().map(|k| k.as_raw_fd());
        let (Some(raw), Some(handler)) = (raw, handler) else {
            drop(state);
            kick_loop.request_pass();
            return Ok(true);
        };
        // epoll_ctl(DEL) ignores the event data; the framework refuses
        // queue indices here, so pass a listener ID above them. ENOENT
        // (already taken over) is fine. An event the epoll thread already
        // holds for this eventfd may still come: `TolerantVring` reads its
        // kick without failing when this thread took the count first.
        let _ = handler.unregister_listener(raw, EventSet::IN, u64::from(FAULT_WAKE_EVENT) + 1);
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the vring owns (and keeps
        // open: it is locked); the result is a new descriptor owned by
        // nobody else.
        let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
        drop(state);
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just created and is owned here alone.
        let dup = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        kick_loop.hand_over(dup, vring.clone());
        debug!("request-queue kick eventfd handed to the io_uring thread");
        Ok(true)
    }

    /// Queues a fault record for the guest's event queue and wakes the
    /// worker to deliver it. Never blocks on the driver.
    pub(crate) fn report_fault(&self, record: FaultRecord) -> io::Result<()> {
        self.inner.telemetry.fault_reported(&record);
        self.inner.faults.lock().map_err(lock_error)?.push(record);
        self.inner.fault_wake.write(1)
    }

    /// Calls `answer` with what `endpoint` reaches at `iova` for `access`
    /// now, under the device lock (so that nothing changes the model in
    /// between). The fault reason when it reaches nothing.
    pub(crate) fn with_translation(
        &self,
        endpoint: u32,
        iova: u64,
        access: iotlb_shm::Access,
        answer: impl FnOnce(Result<viommu_core::Translation, virtio_iommu_proto::FaultReason>),
    ) {
        let Ok(st) = self.state() else {
            return answer(Err(virtio_iommu_proto::FaultReason::Domain));
        };
        let access = match (access.bits() & 1 != 0, access.bits() & 2 != 0) {
            (true, true) => viommu_core::Access::ReadWrite,
            (false, true) => viommu_core::Access::Write,
            _ => viommu_core::Access::Read,
        };
        answer(
            st.device
                .translate(endpoint, iova, access)
                .map_err(|e| match e {
                    viommu_core::TranslateError::Fault(f) => f.reason,
                    _ => virtio_iommu_proto::FaultReason::Domain,
                }),
        );
    }

    /// The eventfd the worker must watch (as [`FAULT_WAKE_EVENT`]) for
    /// reported faults.
    pub(crate) fn fault_wake_fd(&self) -> RawFd {
        self.inner.fault_wake.as_raw_fd()
    }

    /// Event-queue counters.
    pub(crate) fn fault_stats(&self) -> FaultStats {
        self.inner
            .faults
            .lock()
            .map(|q| q.stats)
            .unwrap_or_default()
    }

    /// Calls `look` with the device model, under the device lock (keep it
    /// short: the request queue waits meanwhile).
    pub(crate) fn inspect<R>(&self, look: impl FnOnce(&viommu_core::Device) -> R) -> io::Result<R> {
        Ok(look(&self.state()?.device))
    }

    /// Writes pending faults into the buffers the driver posted.
    fn deliver_faults(&self, vring: &VringRwLock) -> io::Result<()> {
        // Before the driver set up guest memory the faults wait: they go
        // out with the event queue's first buffers.
        let Ok(mem) = self.memory() else {
            return Ok(());
        };
        let ram = request_ring::ram_access(&mem);
        let mut faults = self.inner.faults.lock().map_err(lock_error)?;
        let mut used = false;
        while faults.pending() > 0 {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.memory())
                .map_err(io::Error::other)?
                .next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descs = chain
                .clone()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()));
            if let Some(len) = faults.fill(&ram, descs) {
                vring.add_used(head, len).map_err(io::Error::other)?;
                used = true;
            }
        }
        if used && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn state(&self) -> io::Result<MutexGuard<'_, DeviceState>> {
        self.inner.state.lock().map_err(lock_error)
    }

    fn memory(&self) -> io::Result<GuestMem> {
        self.inner
            .mem
            .read()
            .map_err(lock_error)?
            .clone()
            .ok_or_else(|| io::Error::other("queue event before SET_MEM_TABLE"))
    }

    /// Serves every available request, completing in order; requests that
    /// narrowed access complete after one grace period for the batch.
    fn process_request_queue(&self, vring: &VringRwLock) -> io::Result<usize> {
        let mut ring = self.inner.ring.lock().map_err(lock_error)?;
        let generation = self.inner.mem_generation.load(Ordering::Acquire);
        ring.use_memory(generation, || {
            let mem = self.inner.mem.read().ok()?;
            mem.as_ref().map(request_ring::ram_access)
        });
        let woken = Instant::now();
        ring.poll.woken(woken);
        let mut total = 0;
        // When this thread found the requests of the next pass (woken for
        // them, or polling): the latency histogram measures from there to
        // their completion, with the clock reads polling makes anyway.
        let mut found = woken;
        loop {
            // Kicks stay off while requests keep coming and while polling:
            // a driver that sees them off does not kick, which saves it a
            // system call and this thread a wake-up per batch.
            let taken = self.pass(&mut ring, vring)?;
            let done = Instant::now();
            if taken > 0 {
                let ns = u64::try_from(done.duration_since(found).as_nanos()).unwrap_or(u64::MAX);
                ring.telemetry()
                    .requests
                    .latency
                    .observe_owned(ns, taken as u64);
            }
            total += taken;
            // More already there, or arriving within the polling window:
            // another pass (an empty pass costs more than a look).
            if let Some(seen) = self.poll_for_more(&mut ring, done) {
                found = seen;
                continue;
            }
            // Going to sleep: ask for kicks, then look once more (a request
            // published before the driver saw kicks on finds no kick).
            if !self.enable_kicks(&mut ring, vring)? {
                ring.poll.sleeping(Instant::now());
                return Ok(total);
            }
            found = Instant::now();
        }
    }

    /// Whether requests wait in the request queue (looked at, not served).
    fn has_requests(&self, vring: &VringRwLock) -> bool {
        let Ok(mut ring) = self.inner.ring.lock() else {
            return false;
        };
        let vstate = vring.get_mut();
        if !ring.sync(vstate.get_queue()).unwrap_or(false) {
            return false;
        }
        ring.parts().is_ok_and(|p| p.has_available())
    }

    /// Asks the driver to kick for its next request; true if requests
    /// arrived meanwhile (serve them before sleeping).
    fn enable_kicks(&self, ring: &mut RequestRing, vring: &VringRwLock) -> io::Result<bool> {
        let vstate = vring.get_mut();
        if !ring.sync(vstate.get_queue()).map_err(io::Error::other)? {
            return Ok(false);
        }
        let mut pass = ring.parts().map_err(io::Error::other)?;
        let more = pass.kicks_on();
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(
                state = %pass,
                event_idx = virtio_queue::QueueT::event_idx_enabled(vstate.get_queue()),
                more,
                "request queue: kicks enabled"
            );
        }
        Ok(more)
    }

    /// One pass: takes and serves what is available, completes it, with
    /// kicks off. Returns how many chains it took.
    fn pass(&self, ring: &mut RequestRing, vring: &VringRwLock) -> io::Result<usize> {
        let mut vstate = vring.get_mut();
        if !ring.sync(vstate.get_queue()).map_err(io::Error::other)? {
            return Ok(0);
        }
        let mut pass = ring.parts().map_err(io::Error::other)?;
        pass.kicks_off();
        let mut guard = self.state()?;
        let st = &mut *guard;
        let taken = pass
            .serve_available(&mut st.device, st.publisher.as_mut(), &mut st.journal)
            .map_err(io::Error::other)?;
        let waiting = pass.complete_ready();
        pass.write_back(vstate.get_queue_mut());
        if waiting {
            let wait = st.publisher.synchronize();
            drop(guard);
            if pass.needs_notification() {
                vstate.signal_used_queue()?;
            }
            // Neither lock is held while a backend may still be finishing:
            // the VMM's messages and the backends' misses go on meanwhile.
            drop(vstate);
            wait.wait();
            vstate = vring.get_mut();
            if !pass.in_step(vstate.get_queue()) {
                debug!(
                    "the request queue was stopped during a grace period; its last requests are not completed"
                );
                return Ok(taken);
            }
            pass.complete_rest();
            pass.write_back(vstate.get_queue_mut());
        } else {
            drop(guard);
        }
        if pass.needs_notification() {
            vstate.signal_used_queue()?;
        }
        Ok(taken)
    }

    /// Busy-polls the avail ring from `now` for up to the configured
    /// window; when new requests arrived, the time they were seen.
    fn poll_for_more(&self, ring: &mut RequestRing, now: Instant) -> Option<Instant> {
        let window = ring.poll.window();
        if window.is_zero() {
            return None;
        }
        let pass = ring.parts().ok()?;
        let deadline = now + window;
        let mut seen = now;
        while seen < deadline {
            if pass.has_available() {
                return Some(seen);
            }
            // Yield, not pause: with fewer cores than pollers, a pause-only
            // loop keeps the guest it waits for off the CPU for a whole
            // time slice. Pinned to a core of its own (--cpu), this returns
            // at once.
            std::thread::yield_now();
            seen = Instant::now();
        }
        None
    }
}

impl VhostUserBackend for IommuBackend {
    type Bitmap = ();
    type Vring = TolerantVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.queue_size)
    }

    fn features(&self) -> u64 {
        let device = self
            .state()
            .map(|s| s.device.offered_features().0)
            .unwrap_or(0);
        device | RING_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        let Ok(mut guard) = self.state() else { return };
        let st = &mut *guard;
        // QEMU sends SET_FEATURES at every start of the device.
        st.watch.started();
        let device_bits = Features(features).intersect(st.device.offered_features());
        let mut sink = Publishing::new(st.publisher.as_mut());
        let result = st.device.set_features(device_bits, &mut sink);
        if result.is_ok() {
            state_journal::record(
                &mut st.journal,
                &Record::Features(device_bits.0),
                &st.device,
            );
        }
        match result {
            Ok(()) => info!(
                features = format_args!("{features:#x}"),
                domains = st.device.domain_count(),
                mappings = st.device.mapping_count(),
                "device started: features set (SET_FEATURES)"
            ),
            Err(e) => warn!(error = %e, "feature negotiation refused"),
        }
        if st.publisher.needs_grace() {
            let wait = st.publisher.synchronize();
            drop(guard);
            wait.wait();
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    /// Saves the device's state to `file`, or loads it from there (the
    /// device is stopped: phase STOPPED is the only one defined).
    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        let transfer = match direction {
            VhostTransferStateDirection::SAVE => {
                let faults = self.inner.faults.lock().map_err(lock_error)?.records();
                let snapshot =
                    state::snapshot(&self.state()?.device, &faults, state::Kind::Snapshot);
                info!(
                    bytes = snapshot.len(),
                    "device state saved for the VMM (SET_DEVICE_STATE_FD)"
                );
                device_state::save(snapshot, file)?
            }
            VhostTransferStateDirection::LOAD => {
                info!("loading the device state from the VMM (SET_DEVICE_STATE_FD)");
                device_state::load(file)?
            }
        };
        let previous = self
            .inner
            .transfer
            .lock()
            .map_err(lock_error)?
            .replace(transfer);
        if previous.is_some() {
            warn!("a device state transfer was still under way; its result is dropped");
        }
        Ok(None)
    }

    /// Waits for the transfer; a loaded state replaces the device's only
    /// if all of it applies.
    fn check_device_state(&self) -> io::Result<()> {
        let transfer = self
            .inner
            .transfer
            .lock()
            .map_err(lock_error)?
            .take()
            .ok_or_else(|| io::Error::other("CHECK_DEVICE_STATE without a transfer"))?;
        match transfer.finish() {
            Ok(Finished::Saved) => Ok(()),
            Ok(Finished::Loaded(bytes)) => {
                let config = self.state()?.device.config().clone();
                match state::restore(config, &bytes) {
                    Ok(restored) => self.install(restored.device, restored.faults),
                    Err(e) => {
                        warn!(error = %e, bytes = bytes.len(), "the device state from the VMM does not load; the device is unchanged");
                        Err(io::Error::other(e))
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "device state transfer failed");
                Err(e)
            }
        }
    }

    fn reset_device(&self) {
        let Some((domains, mappings, faults)) = self.drop_state(ResetKind::Device) else {
            return;
        };
        info!(
            domains,
            mappings,
            undelivered_faults = faults,
            "device reset (RESET_DEVICE): all domains and mappings dropped, bypass kept"
        );
    }

    /// Nothing to keep: the request ring takes EVENT_IDX from the vring's
    /// queue, which the framework sets at SET_FEATURES.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let reason = self.state().ok().and_then(|mut st| st.watch.config_read());
        if let Some(reason) = reason {
            self.reset_detected(reason);
        }
        let bytes = match self.state() {
            Ok(st) => st.device.config_space().to_bytes(),
            Err(_) => [0; CONFIG_LEN],
        };
        // Bytes beyond the 40-byte config space read as zero.
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut guard = self.state()?;
        let st = &mut *guard;
        let mut sink = Publishing::new(st.publisher.as_mut());
        let result = st.device.write_config(offset as usize, buf, &mut sink);
        if let (Ok(()), [value]) = (&result, buf) {
            let record = Record::Config {
                offset: offset as u16,
                value: *value,
            };
            state_journal::record(&mut st.journal, &record, &st.device);
        }
        if st.publisher.needs_grace() {
            let wait = st.publisher.synchronize();
            drop(guard);
            wait.wait();
        }
        // A refused write is the guest's doing (a read-only field, a bad
        // value): it changes nothing and must not end the connection, which
        // an error returned here would do.
        if let Err(e) = result {
            warn!(error = %e, offset, len = buf.len(), "config write refused; config unchanged");
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        let regions: Vec<(u64, u64)> = mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let listed: Vec<String> = regions
            .iter()
            .map(|(start, len)| format!("{start:#x}+{len:#x}"))
            .collect();
        info!(regions = ?listed, "guest memory table received (SET_MEM_TABLE)");
        if let Ok(st) = self.state() {
            let range = st.device.config_space().input_range;
            if !input_range_in_one_region(range.start, range.end, &regions) {
                warn!(
                    input_range = format_args!("{:#x}-{:#x}", range.start, range.end),
                    regions = ?listed,
                    "the IOVA input range is not inside one guest RAM region: a backend behind \
                     a QEMU device with iommu_platform=on cannot reach its rings (QEMU passes \
                     ring IOVAs as guest-physical addresses); give --input-range a window inside \
                     guest RAM (docs/qemu.md)"
                );
            }
        }
        *self.inner.mem.write().map_err(lock_error)? = Some(mem);
        self.inner.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// GET_VRING_BASE: the VMM stops a queue (a pause, a reboot, a driver
    /// unbind: [`ResetWatch`] tells them apart later).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let mut st = self.state()?;
        if queue_index == u32::from(REQUEST_QUEUE) {
            st.watch.request_queue_stopped();
        }
        info!(
            queue = queue_index,
            domains = st.device.domain_count(),
            mappings = st.device.mapping_count(),
            "queue stopped (GET_VRING_BASE); state kept until the guest resets the device"
        );
        Ok(())
    }

    /// Never fails: an error returned here would end the framework's
    /// event thread, and with it the device, for this connection and the
    /// next. A failed event is logged (the first few) and counted.
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[TolerantVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if let Err(e) = self.handle_queue_event(device_event, vrings) {
            let n = self.inner.event_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= LOGGED_EVENT_ERRORS {
                warn!(event = device_event, error = %e, "a queue event failed; the device keeps serving");
            }
            if n == LOGGED_EVENT_ERRORS {
                warn!("further failed queue events of this connection are not logged");
            }
        }
        Ok(())
    }
}

impl IommuBackend {
    /// A device reset the VMM did not announce: the guest rebooted or
    /// rebound its driver. Everything goes, as on a system reset (`bypass`
    /// back to its configured value: the firmware of a rebooted guest may
    /// need it), after one grace period for the shared table.
    fn reset_detected(&self, reason: ResetReason) {
        let Some((domains, mappings, faults)) = self.drop_state(ResetKind::System) else {
            return;
        };
        info!(
            domains,
            mappings,
            undelivered_faults = faults,
            why = %reason,
            "device reset detected without RESET_DEVICE: all domains and mappings dropped, bypass back to its configured value"
        );
    }

    /// A backend saw the guest set a queue of `endpoint` up anew
    /// (`DRIVER_RESTARTED`): while this device is stopped, that means the
    /// guest was reset (its firmware or a new kernel drives the endpoint)
    /// and the state goes now, before that endpoint's first DMA.
    pub(crate) fn endpoint_driver_restarted(&self, pid: i32, endpoint: u32) {
        let reason = self
            .state()
            .ok()
            .and_then(|mut st| st.watch.endpoint_restarted(endpoint, pid));
        match reason {
            Some(reason) => self.reset_detected(reason),
            None => debug!(
                pid,
                endpoint,
                "an endpoint's driver set its queues up anew; the IOMMU runs, nothing to reset"
            ),
        }
    }

    /// Resets the device, waits one grace period for the shared table, and
    /// forgets the fault records the reset driver will never read. Returns
    /// what was dropped: (domains, mappings, undelivered faults).
    fn drop_state(&self, kind: ResetKind) -> Option<(usize, u32, usize)> {
        let mut guard = self.state().ok()?;
        let st = &mut *guard;
        st.watch.reset();
        let (domains, mappings) = (st.device.domain_count(), st.device.mapping_count());
        let mut sink = Publishing::new(st.publisher.as_mut());
        let record = match kind {
            ResetKind::Device => {
                st.device.reset(&mut sink);
                Record::Reset
            }
            ResetKind::System => {
                st.device.system_reset(&mut sink);
                Record::SystemReset
            }
        };
        state_journal::record(&mut st.journal, &record, &st.device);
        let wait = st.publisher.synchronize();
        drop(guard);
        wait.wait();
        let faults = self.inner.faults.lock().map(|mut f| f.clear()).unwrap_or(0);
        Some((domains, mappings, faults))
    }

    fn handle_queue_event(&self, device_event: u16, vrings: &[TolerantVring]) -> io::Result<()> {
        match device_event {
            REQUEST_QUEUE => {
                let vring = vrings
                    .get(usize::from(REQUEST_QUEUE))
                    .map(TolerantVring::rwlock)
                    .ok_or_else(|| io::Error::other("no request queue"))?;
                if self.hand_over_kick(vring)? {
                    return Ok(());
                }
                self.process_request_queue(vring).map(drop)
            }
            // Buffers stay in the ring until a fault needs one.
            EVENT_QUEUE | FAULT_WAKE_EVENT => {
                if device_event == FAULT_WAKE_EVENT {
                    // Reading resets the counter; nothing to read is fine.
                    let _ = self.inner.fault_wake.read();
                }
                let vring = vrings
                    .get(usize::from(EVENT_QUEUE))
                    .map(TolerantVring::rwlock)
                    .ok_or_else(|| io::Error::other("no event queue"))?;
                self.deliver_faults(vring)
            }
            other => Err(io::Error::other(format!("event on unknown queue {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::input_range_in_one_region;

    #[test]
    fn input_range_must_sit_inside_a_single_ram_region() {
        let regions = [(0, 0xa_0000), (0x10_0000, 0x1ff0_0000)];
        assert!(input_range_in_one_region(
            0x1000_0000,
            0x1fff_ffff,
            &regions
        ));
        assert!(
            !input_range_in_one_region(0x1000_0000, 0x2000_0000, &regions),
            "past the end"
        );
        assert!(
            !input_range_in_one_region(0, 0xffff_ffff_ffff, &regions),
            "the 48-bit default"
        );
        assert!(
            !input_range_in_one_region(0x9_0000, 0x10_1000, &regions),
            "across a hole"
        );
        assert!(!input_range_in_one_region(0, 0xfff, &[]), "no memory");
    }
}
