//! A guest driver stand-in: brings the device up the way a VMM plus the
//! Linux virtio-iommu driver do, then sends requests the Linux way (queue
//! several, kick once, poll the used ring until all completed) and reads
//! fault records from the event queue.

use crate::connection::{Connection, ConnectionError, linux_driver_features};
use crate::memory::{GuestRam, Mem, MemoryError};
use crate::split_ring::{ChainSpec, Layout, RawDesc, RingError, SplitRing, Used};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use virtio_iommu_proto::fault::FAULT_RECORD_LEN;
use virtio_iommu_proto::request::TAIL_LEN;
use virtio_iommu_proto::{
    ConfigSpace, EVENT_QUEUE, FaultRecord, REQUEST_QUEUE, Request, RequestType, Status,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

pub mod vmm_replay;

/// Default guest RAM: 1 GiB (the shared traces' GPAs fall inside it).
pub const DEFAULT_RAM_SIZE: u64 = 1 << 30;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Polls of the used ring before sleeping on the call eventfd.
const SPINS: u32 = 64_000;
/// Polls between yields of the CPU while spinning.
const YIELD_EVERY: u32 = 16;

/// How to bring the device up.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// Size of both virtqueues.
    pub queue_size: u16,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered (Linux does).
    pub event_idx: bool,
    /// Exact features to ack instead of the Linux choice.
    pub features: Option<u64>,
    /// Descriptor layout of requests.
    pub layout: Layout,
    /// Longest wait for the device to complete a batch.
    pub timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            ram_size: DEFAULT_RAM_SIZE,
            queue_size: DEFAULT_QUEUE_SIZE,
            event_idx: true,
            features: None,
            layout: Layout::Two,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Which step of driving the device failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A vhost-user message.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The virtqueue.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// Creating, writing or waiting on an eventfd.
    #[error("eventfd {0} failed")]
    EventFd(&'static str, #[source] std::io::Error),
    /// The device did not complete the batch in time.
    #[error("the device completed nothing for {waited:?} with {in_flight} requests in flight")]
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// Chains still in flight.
        in_flight: usize,
    },
    /// A batch needs more free descriptors than the ring has now.
    #[error("a batch needs {needed} descriptors, more than the request ring has free")]
    RingFull {
        /// Descriptors the batch needs.
        needed: usize,
    },
    /// The feature set to ack is missing something the driver needs.
    #[error("the device does not offer {0}, which the driver requires")]
    MissingFeature(&'static str),
    /// A recorded VMM sequence asks for something this driver lacks.
    #[error("cannot replay: {0}")]
    Replay(String),
}

/// What the device made of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Used length the device reported.
    pub used_len: u32,
    /// The whole writable part after completion.
    pub writable: Vec<u8>,
}

impl Outcome {
    /// The 4 tail bytes where the driver placed them (the end of the
    /// writable part), if it has 4 bytes.
    pub fn tail(&self) -> Option<[u8; TAIL_LEN]> {
        let n = self.writable.len();
        let t = self.writable.get(n.checked_sub(TAIL_LEN)?..)?;
        t.try_into().ok()
    }

    /// The status byte as Linux reads it: only when the used length is the
    /// exact writable size (otherwise `None`).
    pub fn status_byte(&self) -> Option<u8> {
        if self.used_len as usize != self.writable.len() {
            return None;
        }
        self.tail().map(|t| t[0])
    }

    /// The status, if the device completed the request with a defined one.
    pub fn status(&self) -> Option<Status> {
        self.status_byte().and_then(Status::from_u8)
    }

    /// The PROBE properties area (the writable part before the tail).
    pub fn properties(&self) -> &[u8] {
        let n = self.writable.len().saturating_sub(TAIL_LEN);
        &self.writable[..n]
    }
}

/// One buffer the device returned on the event queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Used length.
    pub used_len: u32,
    /// The buffer's bytes.
    pub bytes: Vec<u8>,
    /// The fault record, decoded as Linux does (`None` when used_len is not
    /// 24 or the reserved bytes are set).
    pub record: Option<FaultRecord>,
}

/// Field boundaries of a request's readable part (head, then each field).
pub fn readable_fields(t: RequestType) -> &'static [usize] {
    match t {
        RequestType::Attach => &[4, 8, 12, 16],
        RequestType::Detach => &[4, 8, 12],
        RequestType::Map => &[4, 8, 16, 24, 32],
        RequestType::Unmap => &[4, 8, 16, 24],
        RequestType::Probe => &[4, 8],
    }
}

/// The chain a Linux-like driver posts for `req`: readable fields, then a
/// writable part of exactly 4 bytes (PROBE: `probe_size` + 4).
pub fn chain_for(req: &Request, probe_size: u32, layout: Layout) -> ChainSpec {
    let t = req.req_type();
    let (wlen, wfields) = match t {
        RequestType::Probe => (probe_size as usize + TAIL_LEN, vec![probe_size as usize]),
        _ => (TAIL_LEN, Vec::new()),
    };
    ChainSpec::with_layout(req.encode(), wlen, layout, readable_fields(t), &wfields)
}

struct Queue {
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn new(ram: &mut GuestRam, size: u16, event_idx: bool) -> Result<Queue, DriverError> {
        Ok(Queue {
            ring: SplitRing::new(ram, size, event_idx)?,
            kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                .map_err(|e| DriverError::EventFd("create", e))?,
            call: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                .map_err(|e| DriverError::EventFd("create", e))?,
        })
    }

    fn publish_and_kick(&mut self, mem: &Mem) -> Result<(), DriverError> {
        if self.ring.publish(mem)? {
            self.kick
                .write(1)
                .map_err(|e| DriverError::EventFd("kick", e))?;
        }
        Ok(())
    }

    /// Sleeps on the call eventfd for at most `limit`.
    fn sleep(&self, limit: Duration) -> Result<(), DriverError> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(limit.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll on one live pollfd we own, for at most `ms`.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(DriverError::EventFd("poll", e));
            }
        }
        if rc > 0 {
            // Non-blocking read resets the counter; EAGAIN is fine.
            let _ = self.call.read();
        }
        Ok(())
    }

    /// Polls the used ring (spin, then sleep on the call eventfd) until
    /// nothing is in flight, handing each used chain to `sink`.
    fn drain(
        &mut self,
        mem: &Mem,
        timeout: Duration,
        sink: impl FnMut(Used),
    ) -> Result<(), DriverError> {
        self.collect(mem, timeout, self.ring.in_flight(), sink)
    }

    /// Polls the used ring (spin, then sleep on the call eventfd) until at
    /// least `min` chains were used (or nothing is in flight), handing each
    /// used chain to `sink`.
    fn collect(
        &mut self,
        mem: &Mem,
        timeout: Duration,
        min: usize,
        mut sink: impl FnMut(Used),
    ) -> Result<(), DriverError> {
        let mut last_progress = Instant::now();
        let mut got = 0usize;
        while self.ring.in_flight() > 0 {
            let mut progressed = false;
            while let Some(u) = self.ring.pop_used(mem)? {
                sink(u);
                got += 1;
                progressed = true;
            }
            if self.ring.in_flight() == 0 || got >= min {
                break;
            }
            if progressed {
                last_progress = Instant::now();
                continue;
            }
            let mut spins = 0;
            while spins < SPINS && !self.ring.has_used(mem)? {
                // Mostly pause, as Linux's driver spins on the used ring;
                // yield now and then: the daemon being waited for may need
                // this CPU.
                if spins % YIELD_EVERY == YIELD_EVERY - 1 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                spins += 1;
            }
            if self.ring.has_used(mem)? {
                continue;
            }
            let waiting = u16::try_from((min - got).min(self.ring.in_flight())).unwrap_or(u16::MAX);
            self.ring.arm_used_event(mem, waiting)?;
            if self.ring.has_used(mem)? {
                continue;
            }
            let waited = last_progress.elapsed();
            if waited >= timeout {
                return Err(DriverError::Timeout {
                    waited,
                    in_flight: self.ring.in_flight(),
                });
            }
            self.sleep((timeout - waited).min(Duration::from_millis(100)))?;
        }
        Ok(())
    }
}

/// A VMM + guest driver talking to one vhost-user-iommu daemon.
pub struct Driver {
    conn: Connection,
    ram: GuestRam,
    ring_mark: u64,
    reqq: Queue,
    evq: Queue,
    config: ConfigSpace,
    acked: u64,
    opts: DriverOptions,
    slots: Vec<usize>,
}

impl Driver {
    /// Connects to `socket` and brings the device up: read the config,
    /// ack features, SET_MEM_TABLE, set up and enable both rings.
    pub fn connect(socket: &Path, opts: DriverOptions) -> Result<Driver, DriverError> {
        let mut conn = Connection::connect(socket)?;
        let config = conn.config()?;
        let mut ram = GuestRam::new(opts.ram_size)?;
        let ring_mark = ram.mark();
        let reqq = Queue::new(&mut ram, opts.queue_size, opts.event_idx)?;
        let evq = Queue::new(&mut ram, opts.queue_size, opts.event_idx)?;
        let mut d = Driver {
            conn,
            ram,
            ring_mark,
            reqq,
            evq,
            config,
            acked: 0,
            slots: vec![0; usize::from(opts.queue_size)],
            opts,
        };
        d.conn.set_mem_table(&d.ram)?;
        d.bring_up()?;
        Ok(d)
    }

    /// Features to ack, then the rings.
    fn bring_up(&mut self) -> Result<(), DriverError> {
        let offered = self.conn.offered_features();
        let acked = match self.opts.features {
            Some(f) => f,
            None => {
                let f = linux_driver_features(offered, self.opts.event_idx);
                for (bit, name) in [(32, "VIRTIO_F_VERSION_1"), (2, "VIRTIO_IOMMU_F_MAP_UNMAP")] {
                    if f & (1u64 << bit) == 0 {
                        return Err(DriverError::MissingFeature(name));
                    }
                }
                f
            }
        };
        let event_idx = acked & (1 << virtio_iommu_proto::features::VIRTIO_RING_F_EVENT_IDX) != 0;
        if event_idx != self.opts.event_idx {
            // Rebuild the rings for the notification scheme actually acked.
            self.ram.release_to(self.ring_mark);
            self.reqq = Queue::new(&mut self.ram, self.opts.queue_size, event_idx)?;
            self.evq = Queue::new(&mut self.ram, self.opts.queue_size, event_idx)?;
        }
        self.conn.set_features(acked)?;
        self.acked = acked;
        for (index, q) in [
            (usize::from(REQUEST_QUEUE), &self.reqq),
            (usize::from(EVENT_QUEUE), &self.evq),
        ] {
            self.conn
                .setup_vring(index, &self.ram, &q.ring.addrs(), &q.kick, &q.call)?;
        }
        self.conn.enable_vring(usize::from(REQUEST_QUEUE), true)?;
        self.conn.enable_vring(usize::from(EVENT_QUEUE), true)?;
        Ok(())
    }

    /// Connects again to `socket` after the backend went away, as QEMU
    /// does with a `reconnect-ms` chardev: the guest keeps running, so the
    /// device is started again with the same features, guest memory and
    /// rings, each ring resuming at its used index (the requests the old
    /// backend had taken but not completed are served again). The config
    /// space is not read: a running guest has no reason to.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), DriverError> {
        self.conn = Connection::connect(socket)?;
        self.conn.set_features(self.acked)?;
        self.conn.set_mem_table(&self.ram)?;
        let mem = self.ram.mem();
        for (index, q) in [
            (usize::from(REQUEST_QUEUE), &self.reqq),
            (usize::from(EVENT_QUEUE), &self.evq),
        ] {
            let base = q.ring.used_idx(mem)?;
            self.conn
                .setup_vring_at(index, &self.ram, &q.ring.addrs(), base, &q.kick, &q.call)?;
        }
        self.conn.enable_vring(usize::from(REQUEST_QUEUE), true)?;
        self.conn.enable_vring(usize::from(EVENT_QUEUE), true)?;
        // Wake the new backend for what is already in the rings.
        for q in [&self.reqq, &self.evq] {
            q.kick
                .write(1)
                .map_err(|e| DriverError::EventFd("kick", e))?;
        }
        Ok(())
    }

    /// RESET_DEVICE, then a fresh bring-up (new rings, features acked again).
    pub fn reset(&mut self) -> Result<(), DriverError> {
        self.conn.reset_device()?;
        self.ram.release_to(self.ring_mark);
        let event_idx = self.opts.event_idx;
        self.reqq = Queue::new(&mut self.ram, self.opts.queue_size, event_idx)?;
        self.evq = Queue::new(&mut self.ram, self.opts.queue_size, event_idx)?;
        self.config = self.conn.config()?;
        self.bring_up()
    }

    /// The config space read at connection (or last reset).
    pub fn config(&self) -> ConfigSpace {
        self.config
    }

    /// Features acked.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The vhost-user connection, for config reads/writes and the like.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Guest RAM (tests allocate scratch buffers from it).
    pub fn ram(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// The layout requests are sent with.
    pub fn layout(&self) -> Layout {
        self.opts.layout
    }

    /// Changes the layout of later requests.
    pub fn set_layout(&mut self, layout: Layout) {
        self.opts.layout = layout;
    }

    /// Sends `reqs` with the current layout: all queued, one kick, then
    /// the used ring is polled until every one completed. (When the ring
    /// fills up first, the queued ones are kicked and drained, as Linux
    /// does on -ENOSPC.) Outcomes are in request order.
    pub fn send(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, DriverError> {
        let specs: Vec<ChainSpec> = reqs
            .iter()
            .map(|r| chain_for(r, self.config.probe_size, self.opts.layout))
            .collect();
        self.send_chains(&specs)
    }

    /// Sends one request.
    pub fn send_one(&mut self, req: &Request) -> Result<Outcome, DriverError> {
        let mut v = self.send(std::slice::from_ref(req))?;
        v.pop().ok_or(DriverError::Timeout {
            waited: Duration::ZERO,
            in_flight: 0,
        })
    }

    /// Sends arbitrary chains (e.g. a short readable part or odd cuts).
    pub fn send_chains(&mut self, specs: &[ChainSpec]) -> Result<Vec<Outcome>, DriverError> {
        let mut out: Vec<Option<Outcome>> = vec![None; specs.len()];
        for (i, spec) in specs.iter().enumerate() {
            if SplitRing::descriptors_needed(spec) > self.reqq.ring.free_descriptors() {
                self.flush(&mut out)?;
            }
            let head = self.reqq.ring.add(self.ram.mem(), spec)?;
            self.slots[usize::from(head)] = i;
        }
        self.flush(&mut out)?;
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Queues one request and kicks, without waiting for its completion
    /// (collect it with [`Self::wait_posted`]): lets a test kick the device
    /// at a chosen moment of a VMM's message sequence.
    pub fn post(&mut self, req: &Request) -> Result<(), DriverError> {
        let spec = chain_for(req, self.config.probe_size, self.opts.layout);
        let head = self.reqq.ring.add(self.ram.mem(), &spec)?;
        self.slots[usize::from(head)] = 0;
        self.reqq.publish_and_kick(self.ram.mem())
    }

    /// Waits for the request [`Self::post`] queued.
    pub fn wait_posted(&mut self) -> Result<Outcome, DriverError> {
        let mut out = [None];
        let mem = self.ram.mem();
        self.reqq.drain(mem, self.opts.timeout, |u| {
            out[0] = Some(Outcome {
                used_len: u.len,
                writable: u.writable,
            });
        })?;
        let [done] = out;
        done.ok_or(DriverError::Timeout {
            waited: self.opts.timeout,
            in_flight: 0,
        })
    }

    /// The chain `req` becomes with the current layout.
    pub fn chain_spec(&self, req: &Request) -> ChainSpec {
        chain_for(req, self.config.probe_size, self.opts.layout)
    }

    /// Queues as many of `chains` as the ring has room for, in order, and
    /// kicks once, without waiting: the driver keeps several batches in
    /// flight (collect them with [`Self::collect`]). Each chain is known
    /// by `first` + its position in `chains`. Returns how many were queued;
    /// fails with nothing queued if not even the first one fits.
    pub fn post_batch(&mut self, chains: &[ChainSpec], first: usize) -> Result<usize, DriverError> {
        let mut posted = 0;
        for spec in chains {
            let needed = SplitRing::descriptors_needed(spec);
            if needed > self.reqq.ring.free_descriptors() {
                if posted == 0 {
                    return Err(DriverError::RingFull { needed });
                }
                break;
            }
            let head = self.reqq.ring.add(self.ram.mem(), spec)?;
            self.slots[usize::from(head)] = first + posted;
            posted += 1;
        }
        self.reqq.publish_and_kick(self.ram.mem())?;
        Ok(posted)
    }

    /// Descriptors `chains` take in the request ring.
    pub fn descriptors_needed(chains: &[ChainSpec]) -> usize {
        chains.iter().map(SplitRing::descriptors_needed).sum()
    }

    /// Free descriptors in the request ring.
    pub fn free_descriptors(&self) -> usize {
        self.reqq.ring.free_descriptors()
    }

    /// Requests posted with [`Self::post_batch`] and not collected yet.
    pub fn in_flight(&self) -> usize {
        self.reqq.ring.in_flight()
    }

    /// Waits until at least `min` posted requests completed (fewer if fewer
    /// are in flight), calling `done(index, outcome)` for each completed
    /// one, in completion order.
    pub fn collect(
        &mut self,
        min: usize,
        mut done: impl FnMut(usize, Outcome),
    ) -> Result<(), DriverError> {
        let mem = self.ram.mem();
        let slots = &self.slots;
        self.reqq.collect(mem, self.opts.timeout, min, |u| {
            if let Some(&i) = slots.get(usize::from(u.head)) {
                done(
                    i,
                    Outcome {
                        used_len: u.len,
                        writable: u.writable,
                    },
                );
            }
        })
    }

    /// Sends raw (possibly hostile) chains, one kick for all.
    pub fn send_raw(&mut self, chains: &[Vec<RawDesc>]) -> Result<Vec<Outcome>, DriverError> {
        let mut out: Vec<Option<Outcome>> = vec![None; chains.len()];
        for (i, raw) in chains.iter().enumerate() {
            if raw.len() > self.reqq.ring.free_descriptors() {
                self.flush(&mut out)?;
            }
            let head = self.reqq.ring.add_raw(self.ram.mem(), raw)?;
            self.slots[usize::from(head)] = i;
        }
        self.flush(&mut out)?;
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn flush(&mut self, out: &mut [Option<Outcome>]) -> Result<(), DriverError> {
        let mem = self.ram.mem();
        self.reqq.publish_and_kick(mem)?;
        let slots = &self.slots;
        self.reqq.drain(mem, self.opts.timeout, |u| {
            if let Some(o) = slots.get(usize::from(u.head)).and_then(|&i| out.get_mut(i)) {
                *o = Some(Outcome {
                    used_len: u.len,
                    writable: u.writable,
                });
            }
        })
    }

    /// Posts `count` event buffers of `len` device-writable bytes each.
    pub fn post_event_buffers(&mut self, count: usize, len: usize) -> Result<(), DriverError> {
        let spec = ChainSpec {
            readable: Vec::new(),
            writable_len: len,
            readable_cuts: Vec::new(),
            writable_cuts: Vec::new(),
            indirect: false,
            prefill: 0,
        };
        for _ in 0..count {
            self.evq.ring.add(self.ram.mem(), &spec)?;
        }
        self.evq.publish_and_kick(self.ram.mem())
    }

    /// Event buffers posted and not yet returned.
    pub fn event_buffers_posted(&self) -> usize {
        self.evq.ring.in_flight()
    }

    /// Takes the event buffers the device returned, waiting up to `wait`
    /// for the first one.
    pub fn take_events(&mut self, wait: Duration) -> Result<Vec<Event>, DriverError> {
        let mem = self.ram.mem();
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        loop {
            while let Some(u) = self.evq.ring.pop_used(mem)? {
                let record = (u.len as usize == FAULT_RECORD_LEN)
                    .then(|| u.writable.get(..FAULT_RECORD_LEN))
                    .flatten()
                    .and_then(|b| b.try_into().ok())
                    .and_then(|b: &[u8; FAULT_RECORD_LEN]| FaultRecord::from_bytes(b));
                events.push(Event {
                    used_len: u.len,
                    bytes: u.writable,
                    record,
                });
            }
            let now = Instant::now();
            if !events.is_empty() || now >= deadline || self.evq.ring.in_flight() == 0 {
                return Ok(events);
            }
            self.evq.ring.arm_used_event(mem, 1)?;
            if !self.evq.ring.has_used(mem)? {
                self.evq
                    .sleep((deadline - now).min(Duration::from_millis(50)))?;
            }
        }
    }
}
