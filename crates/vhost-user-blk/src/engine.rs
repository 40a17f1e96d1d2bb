//! One queue's I/O engine: its own io_uring, its own translation handle.
//!
//! A pass drains the available ring inside one DMA batch (one session of
//! the shared table in table mode): each chain is split and planned by the
//! pure device logic, its data ranges are translated and — for I/O that
//! goes to the kernel — held (pinned) for exactly as long as the I/O is in
//! flight, and it becomes one SQE (readv/writev straight into guest memory,
//! fsync, fallocate). The batch's SQEs are submitted with one
//! `io_uring_enter`. Completions, in any order, release their holds, then
//! get their status byte and used entry in the next pass; the driver is
//! notified once per pass (EVENT_IDX honoured).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use tracing::{debug, info, warn};
use viommu_backend::{
    Access, Batch, Chain, DmaError, IoHold, QueueDma, RingAddrs, RingView, SplitQueue,
};

use crate::cache::{WriteCache, write_cache};
use crate::disk::DiskInfo;
use crate::layout::{self, ByteRange, Stream};
use crate::plan::{Plan, plan, used_len};
use crate::request::{HEADER_LEN, RequestHeader, Status};
use crate::segments::{SegmentOp, check_segments, parse_segments};
use crate::serial::ID_BYTES;
use crate::target::{Backing, Target, ZeroMode};

/// Most data pieces (iovecs) one request may have.
const MAX_IOVECS: usize = 1024;

/// What every queue of a device shares.
#[derive(Debug)]
pub struct Shared {
    /// The storage.
    pub target: Target,
    /// Features the driver accepted.
    pub negotiated: AtomicU64,
    /// The config space's `writeback` byte.
    pub writeback: AtomicU8,
    /// GET_ID answer.
    pub id: [u8; ID_BYTES],
    /// Busy-poll this long before sleeping (`--poll-us`).
    pub poll: Duration,
}

impl Shared {
    fn disk(&self) -> &DiskInfo {
        &self.target.disk
    }
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests completed.
    pub requests: u64,
    /// Requests that completed with IOERR or UNSUPP.
    pub failed: u64,
    /// DMA faults met.
    pub faults: u64,
    /// Passes over the available ring.
    pub passes: u64,
    /// Requests put back in the ring to wait for a pin record (all were
    /// held by I/O in flight).
    pub deferred: u64,
}

/// A request whose I/O is in the kernel.
#[derive(Debug)]
struct InFlight {
    head: u16,
    status_at: Option<u64>,
    plan: Plan,
    /// Bytes the I/O must transfer (read/write), 0 otherwise.
    expected: u64,
    /// SQEs not completed yet.
    remaining: u32,
    failed: bool,
    hold: Option<IoHold>,
    /// The iovec array the SQE points to: the kernel may read it until the
    /// completion, so it lives in the slot until then.
    _iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory kept mapped by `hold`; they
// are only handed to the kernel and never dereferenced by Rust code.
unsafe impl Send for InFlight {}

/// A request ready for its status and used entry.
#[derive(Debug)]
struct Done {
    head: u16,
    status_at: Option<u64>,
    status: Status,
    used: u32,
}

/// One queue's engine.
pub struct Engine {
    index: usize,
    shared: Arc<Shared>,
    ring: IoUring,
    completion_fd: vmm_sys_util::eventfd::EventFd,
    /// The device's DMA (fault reports).
    device: viommu_backend::Dma,
    dma: QueueDma,
    queue: Option<SplitQueue>,
    /// Where the queue stood when it was last stopped (rings, next
    /// available entry), to tell a restart after a pause from a driver
    /// that sets the queue up anew.
    last_stop: Option<(RingAddrs, u16)>,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    done: Vec<Done>,
    chain: Chain,
    segs: Vec<layout::Segment>,
    unsubmitted: u32,
    stopped: bool,
    stats: EngineStats,
}

/// Why an engine could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring set-up.
    #[error("io_uring for queue {0}")]
    Ring(usize, #[source] std::io::Error),
    /// DMA set-up.
    #[error("DMA for queue {0}")]
    Dma(usize, #[source] viommu_backend::SetupError),
    /// The daemon refused to track the ring.
    #[error("registering queue {0}'s io_uring with the IOMMU daemon")]
    Register(usize, #[source] iotlb_shm::ClientError),
}

fn io_err(index: usize) -> impl Fn(std::io::Error) -> EngineError {
    move |e| EngineError::Ring(index, e)
}

impl Engine {
    /// An engine for queue `index` of `queue_size` entries.
    pub fn new(
        index: usize,
        queue_size: u16,
        shared: Arc<Shared>,
        dma: &viommu_backend::Dma,
    ) -> Result<Engine, EngineError> {
        let entries = (u32::from(queue_size) * 2).clamp(8, 32768);
        let ring = IoUring::new(entries).map_err(io_err(index))?;
        let completion_fd =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(io_err(index))?;
        ring.submitter()
            .register_eventfd(completion_fd.as_raw_fd())
            .map_err(io_err(index))?;
        // SAFETY: the ring's descriptor is open for as long as the borrow.
        let ring_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        dma.register_ring(ring_fd)
            .map_err(|e| EngineError::Register(index, e))?;
        let qdma = dma.queue().map_err(|e| EngineError::Dma(index, e))?;
        let n = usize::from(queue_size);
        Ok(Engine {
            index,
            shared,
            ring,
            completion_fd,
            device: dma.clone(),
            dma: qdma,
            queue: None,
            last_stop: None,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n as u32).rev().collect(),
            done: Vec::new(),
            chain: Chain::default(),
            segs: Vec::new(),
            unsubmitted: 0,
            stopped: false,
            stats: EngineStats::default(),
        })
    }

    /// The eventfd the kernel signals when I/O completes (the queue's
    /// thread watches it beside the kick).
    pub fn completion_fd(&self) -> RawFd {
        self.completion_fd.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Requests whose I/O is in the kernel.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Serves the queue until nothing is left to do now. `rings` gives the
    /// queue's current set-up (addresses, resume indices, EVENT_IDX).
    pub fn run(&mut self, rings: &QueueSetup, notify: &mut dyn FnMut()) -> Resume {
        let _ = self.completion_fd.read();
        if self.stopped {
            return self.resume();
        }
        // With --poll-us: the time the queue last did something; polling
        // goes on until it has been idle (no request started or completed)
        // for the whole window.
        let mut last_work = Instant::now();
        loop {
            self.stats.passes += 1;
            let before = (self.stats.requests, self.in_flight());
            self.reap();
            let (pushed, more) = match self.pass(rings) {
                Ok(x) => x,
                Err(e) => {
                    warn!(queue = self.index, error = %e, "the queue stops until the driver sets it up again");
                    self.stopped = true;
                    break;
                }
            };
            if pushed {
                notify();
            }
            self.submit();
            self.reap();
            if !self.done.is_empty() || (more && !self.free.is_empty()) {
                continue;
            }
            if self.shared.poll.is_zero() {
                break;
            }
            let now = Instant::now();
            if (self.stats.requests, self.in_flight()) != before {
                last_work = now;
            }
            if now.duration_since(last_work) >= self.shared.poll {
                break;
            }
            // Yield, not pause: with fewer cores than pollers, a pause-only
            // loop keeps the process it waits for (the guest) off the CPU
            // for a whole time slice. On a core of its own this returns at
            // once.
            std::thread::yield_now();
        }
        self.resume()
    }

    /// Where the queue stands (for GET_VRING_BASE).
    fn resume(&self) -> Resume {
        Resume {
            next_avail: self.queue.as_ref().map(SplitQueue::next_avail),
        }
    }

    /// Waits for every request in flight, completes them, and forgets the
    /// queue's set-up (the driver stopped or reset it).
    pub fn stop(&mut self, rings: &QueueSetup, notify: &mut dyn FnMut()) -> Resume {
        self.submit();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    warn!(queue = self.index, error = %e, "waiting for I/O in flight failed");
                    break;
                }
            }
            self.reap();
        }
        if !self.stopped && !self.done.is_empty() {
            if let Ok((true, _)) = self.pass_completions_only(rings) {
                notify();
            }
        }
        let resume = self.resume();
        if let Some(q) = &self.queue {
            self.last_stop = Some((q.addrs(), q.next_avail()));
        }
        self.done.clear();
        self.queue = None;
        self.stopped = false;
        resume
    }

    /// Takes kernel completions: holds are released at once.
    fn reap(&mut self) {
        let mut finished = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(Some(req)) = self.slots.get_mut(slot) else {
                continue;
            };
            let res = cqe.result();
            if res < 0 || (req.expected > 0 && res as u64 != req.expected) {
                if !req.failed {
                    debug!(
                        queue = self.index,
                        result = res,
                        expected = req.expected,
                        "I/O failed"
                    );
                }
                req.failed = true;
            }
            req.remaining = req.remaining.saturating_sub(1);
            if req.remaining == 0 {
                finished.push(slot);
            }
        }
        for slot in finished {
            if let Some(req) = self.slots[slot].take() {
                drop(req.hold); // the kernel is done with those pages
                let status = if req.failed {
                    Status::IoErr
                } else {
                    Status::Ok
                };
                self.done.push(Done {
                    head: req.head,
                    status_at: req.status_at,
                    status,
                    used: used_len(&req.plan, status),
                });
                self.free.push(slot as u32);
            }
        }
    }

    fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        if let Err(e) = self.ring.submit() {
            warn!(queue = self.index, error = %e, "io_uring submission failed");
        }
        self.unsubmitted = 0;
    }

    fn ensure_queue(&mut self, rings: &QueueSetup) -> Result<(), viommu_backend::RingError> {
        let current = self.queue.as_ref().map(SplitQueue::addrs);
        if current != Some(rings.addrs) {
            // A queue that comes back at other addresses, or at index 0
            // after it had moved, was set up anew by a driver starting over
            // (the guest's firmware or kernel after a reset); a resume after
            // a pause comes back where it stopped. The daemon hears of it
            // before this queue's first DMA (a reset the VMM did not send).
            if let Some((addrs, avail)) = self.last_stop.take().filter(|_| rings.addrs.size != 0) {
                if addrs != rings.addrs || (rings.next_avail == 0 && avail != 0) {
                    info!(queue = self.index, "the driver set the queue up anew");
                    self.dma.dma().driver_restarted();
                }
            }
            self.queue = Some(SplitQueue::new(
                rings.addrs,
                rings.next_avail,
                rings.event_idx,
            )?);
        }
        Ok(())
    }

    fn pass_completions_only(&mut self, rings: &QueueSetup) -> Result<(bool, bool), String> {
        self.ensure_queue(rings)
            .map_err(|e| vhost_user_process::report_line(&e))?;
        let Engine {
            device,
            dma,
            queue,
            done,
            stats,
            ..
        } = self;
        let batch = dma
            .batch()
            .map_err(|e| vhost_user_process::report_line(&e))?;
        let Some(q) = queue.as_mut() else {
            return Ok((false, false));
        };
        let mut view = q
            .view(&batch)
            .map_err(|e| vhost_user_process::report_line(&e))?;
        let pushed = !done.is_empty();
        for d in done.drain(..) {
            finish(&batch, &mut view, device, stats, d);
        }
        view.publish_used();
        Ok((pushed && view.needs_notification(), false))
    }

    /// One pass inside one batch: completions, then new requests.
    /// Returns (notify the driver, more work is available).
    fn pass(&mut self, rings: &QueueSetup) -> Result<(bool, bool), String> {
        self.ensure_queue(rings)
            .map_err(|e| vhost_user_process::report_line(&e))?;
        let Engine {
            index,
            shared,
            ring,
            device,
            dma,
            queue,
            slots,
            free,
            done,
            chain,
            segs,
            unsubmitted,
            stats,
            ..
        } = self;
        let batch = match dma.batch() {
            Ok(b) => b,
            Err(DmaError::NoMemory) => return Ok((false, false)),
            Err(e) => return Err(vhost_user_process::report_line(&e)),
        };
        let Some(q) = queue.as_mut() else {
            return Ok((false, false));
        };
        let event_idx = rings.event_idx;
        let mut view = q.view(&batch).map_err(|e| {
            if let viommu_backend::RingError::Memory(DmaError::Fault(f)) = &e {
                device.report_fault(f);
            }
            vhost_user_process::report_line(&e)
        })?;
        let mut pushed = 0usize;
        let mut deferred = false;
        for d in done.drain(..) {
            finish(&batch, &mut view, device, stats, d);
            pushed += 1;
        }
        if event_idx {
            view.disable_notification();
        }
        let mut ctx = Start {
            index: *index,
            shared,
            ring,
            slots,
            free,
            segs,
            unsubmitted,
            stats,
            dma: device,
            deferred: &mut deferred,
        };
        while !ctx.free.is_empty() {
            match view.pop(chain) {
                Ok(true) => {
                    if let Some(d) = ctx.start(&batch, chain) {
                        finish(&batch, &mut view, ctx.dma, ctx.stats, d);
                        pushed += 1;
                    }
                    if *ctx.deferred {
                        // Back to the ring until a completion frees pins.
                        view.unpop();
                        ctx.stats.deferred += 1;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => return Err(vhost_user_process::report_line(&e)),
            }
        }
        let notify = pushed > 0 && {
            view.publish_used();
            view.needs_notification()
        };
        let more = if event_idx {
            view.enable_notification()
        } else {
            view.has_available()
        };
        // A deferred request waits for a completion (its eventfd wakes the
        // queue), not for another pass now.
        Ok((notify, more && !deferred))
    }
}

/// Where the driver set the queue up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// The rings (device addresses).
    pub addrs: RingAddrs,
    /// Next available entry when (re)starting (the used index is read
    /// from the used ring, see [`SplitQueue::new`]).
    pub next_avail: u16,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// The queue's indices after a pass, to report on GET_VRING_BASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Next available entry (`None`: the queue never ran).
    pub next_avail: Option<u16>,
}

/// Writes a request's status and used entry.
fn finish(
    batch: &Batch<'_>,
    view: &mut RingView<'_>,
    dma: &viommu_backend::Dma,
    stats: &mut EngineStats,
    d: Done,
) {
    stats.requests += 1;
    if d.status != Status::Ok {
        stats.failed += 1;
    }
    let mut used = d.used;
    match d.status_at {
        Some(at) => {
            if let Err(e) = batch.write(at, &[d.status.as_byte()]) {
                // The guest unmapped its status byte while the request was
                // in flight: nothing more can be told.
                fault(dma, stats, &e);
                used = used.saturating_sub(1);
            }
        }
        None => used = 0,
    }
    view.push_used(d.head, used);
}

fn fault(dma: &viommu_backend::Dma, stats: &mut EngineStats, e: &DmaError) {
    stats.faults += 1;
    match e.fault() {
        Some(f) => dma.report_fault(f),
        None => debug!(error = %e, "a request's buffers cannot be used (no fault to report)"),
    }
}

/// What starting a request needs, borrowed from the engine.
struct Start<'a> {
    index: usize,
    shared: &'a Arc<Shared>,
    ring: &'a mut IoUring,
    slots: &'a mut Vec<Option<InFlight>>,
    free: &'a mut Vec<u32>,
    segs: &'a mut Vec<layout::Segment>,
    unsubmitted: &'a mut u32,
    stats: &'a mut EngineStats,
    dma: &'a viommu_backend::Dma,
    /// Set when the chain just started must wait for a pin record.
    deferred: &'a mut bool,
}

impl Start<'_> {
    /// Starts one chain; returns it if it is already done (no kernel I/O).
    fn start(&mut self, batch: &Batch<'_>, chain: &Chain) -> Option<Done> {
        if let Some(e) = &chain.malformed {
            if let viommu_backend::RingError::Memory(DmaError::Fault(f)) = e {
                self.stats.faults += 1;
                self.dma.report_fault(f);
            }
            debug!(queue = self.index, error = %e, "unusable descriptor chain; returned with used length 0");
            return Some(Done {
                head: chain.head,
                status_at: None,
                status: Status::IoErr,
                used: 0,
            });
        }
        self.segs.clear();
        self.segs
            .extend(chain.segments.iter().map(|s| layout::Segment {
                len: s.len,
                writable: s.writable,
            }));
        let addr_of = |p: &layout::Piece| chain.segments[p.segment].addr + u64::from(p.offset);
        let lay = match layout::layout(self.segs) {
            Ok(l) => l,
            Err(m) => {
                debug!(queue = self.index, error = %m, "malformed chain");
                let status_at = layout::status_piece(self.segs).map(|p| addr_of(&p));
                return Some(Done {
                    head: chain.head,
                    status_at,
                    status: Status::IoErr,
                    used: 1,
                });
            }
        };
        let status_at = layout::pieces(self.segs, Stream::Writable, lay.status())
            .next()
            .map(|p| addr_of(&p));
        let fail = |status: Status| Done {
            head: chain.head,
            status_at,
            status,
            used: 1,
        };
        let mut header = [0u8; HEADER_LEN];
        let mut at = 0usize;
        for p in layout::pieces(self.segs, Stream::Readable, lay.header) {
            let len = p.len as usize;
            if let Err(e) = batch.read(addr_of(&p), &mut header[at..at + len]) {
                fault(self.dma, self.stats, &e);
                return Some(fail(Status::IoErr));
            }
            at += len;
        }
        let header = RequestHeader::from_bytes(&header);
        let negotiated = self.shared.negotiated.load(Ordering::Relaxed);
        let plan = plan(&header, &lay, self.shared.disk(), negotiated);
        let done = |status: Status| Done {
            head: chain.head,
            status_at,
            status,
            used: used_len(&plan, status),
        };
        match plan {
            Plan::Fail(s) => Some(done(s)),
            Plan::GetId { len } => {
                let id = &self.shared.id[..len as usize];
                let mut at = 0usize;
                for p in layout::pieces(self.segs, Stream::Writable, ByteRange::new(0, len)) {
                    let l = p.len as usize;
                    if let Err(e) = batch.write(addr_of(&p), &id[at..at + l]) {
                        fault(self.dma, self.stats, &e);
                        return Some(fail(Status::IoErr));
                    }
                    at += l;
                }
                Some(done(Status::Ok))
            }
            Plan::Flush => match &self.shared.target.backing {
                Backing::Null => Some(done(Status::Ok)),
                Backing::File { buffered, .. } => {
                    let sqe = opcode::Fsync::new(types::Fd(buffered.as_raw_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build();
                    self.queue_io(chain.head, status_at, plan, 0, None, Vec::new(), &[sqe])
                }
            },
            Plan::Read { offset_bytes, len } | Plan::Write { offset_bytes, len } => {
                let read = matches!(plan, Plan::Read { .. });
                if len == 0 {
                    return Some(done(Status::Ok));
                }
                let (stream, range, access) = if read {
                    (Stream::Writable, lay.writable_data, Access::WRITE)
                } else {
                    (Stream::Readable, lay.readable_data, Access::READ)
                };
                let ranges: Vec<(u64, u64)> = layout::pieces(self.segs, stream, range)
                    .map(|p| (addr_of(&p), u64::from(p.len)))
                    .collect();
                let mut iov = Vec::with_capacity(ranges.len());
                let hold = match batch.hold(&ranges, access, |host, n| {
                    iov.push(libc::iovec {
                        iov_base: host.cast(),
                        iov_len: n as usize,
                    })
                }) {
                    Ok(h) => h,
                    // Every pin record is held by I/O in flight: the request
                    // waits for a completion instead of failing.
                    Err(DmaError::NoPin(_)) if self.free.len() < self.slots.len() => {
                        *self.deferred = true;
                        return None;
                    }
                    Err(e) => {
                        fault(self.dma, self.stats, &e);
                        return Some(fail(Status::IoErr));
                    }
                };
                if iov.len() > MAX_IOVECS {
                    return Some(fail(Status::IoErr));
                }
                let (buffered, direct) = match &self.shared.target.backing {
                    Backing::Null => return Some(done(Status::Ok)),
                    Backing::File {
                        buffered, direct, ..
                    } => (buffered, direct.as_ref()),
                };
                let block = u64::from(self.shared.disk().logical_block_size);
                let aligned = iov
                    .iter()
                    .all(|v| (v.iov_base as u64) % block == 0 && v.iov_len as u64 % block == 0);
                let fd = match direct {
                    Some(d) if aligned => d.as_raw_fd(),
                    _ => buffered.as_raw_fd(),
                };
                let sqe = if read {
                    opcode::Readv::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                        .offset(offset_bytes)
                        .build()
                } else {
                    let writeback = self.shared.writeback.load(Ordering::Relaxed);
                    let flags = match write_cache(negotiated, writeback) {
                        WriteCache::WriteThrough => libc::RWF_DSYNC,
                        WriteCache::WriteBack => 0,
                    };
                    opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                        .offset(offset_bytes)
                        .rw_flags(flags)
                        .build()
                };
                self.queue_io(chain.head, status_at, plan, len, Some(hold), iov, &[sqe])
            }
            Plan::Discard | Plan::WriteZeroes => {
                let op = if plan == Plan::Discard {
                    SegmentOp::Discard
                } else {
                    SegmentOp::WriteZeroes
                };
                let mut bytes = vec![0u8; lay.readable_data.len() as usize];
                let mut at = 0usize;
                for p in layout::pieces(self.segs, Stream::Readable, lay.readable_data) {
                    let l = p.len as usize;
                    if let Err(e) = batch.read(addr_of(&p), &mut bytes[at..at + l]) {
                        fault(self.dma, self.stats, &e);
                        return Some(fail(Status::IoErr));
                    }
                    at += l;
                }
                let segments = match parse_segments(&bytes, op.max_segments())
                    .and_then(|s| check_segments(&s, self.shared.disk(), op).map(|()| s))
                {
                    Ok(s) => s,
                    Err(status) => return Some(done(status)),
                };
                let (buffered, zeroes) = match &self.shared.target.backing {
                    Backing::Null => return Some(done(Status::Ok)),
                    Backing::File {
                        buffered, zeroes, ..
                    } => (buffered, *zeroes),
                };
                let keep = libc::FALLOC_FL_KEEP_SIZE;
                let mode = match (op, zeroes) {
                    (SegmentOp::Discard, _) | (SegmentOp::WriteZeroes, ZeroMode::PunchHole) => {
                        libc::FALLOC_FL_PUNCH_HOLE | keep
                    }
                    (SegmentOp::WriteZeroes, ZeroMode::ZeroRange) => {
                        libc::FALLOC_FL_ZERO_RANGE | keep
                    }
                };
                let sqes: Vec<squeue::Entry> = segments
                    .iter()
                    .filter(|s| s.num_sectors > 0)
                    .map(|s| {
                        opcode::Fallocate::new(
                            types::Fd(buffered.as_raw_fd()),
                            u64::from(s.num_sectors) * 512,
                        )
                        .offset(s.sector * 512)
                        .mode(mode)
                        .build()
                    })
                    .collect();
                if sqes.is_empty() {
                    return Some(done(Status::Ok));
                }
                self.queue_io(chain.head, status_at, plan, 0, None, Vec::new(), &sqes)
            }
        }
    }

    /// Puts a request's SQEs on the ring (submitted at the end of the pass).
    #[allow(clippy::too_many_arguments)]
    fn queue_io(
        &mut self,
        head: u16,
        status_at: Option<u64>,
        plan: Plan,
        expected: u64,
        hold: Option<IoHold>,
        iov: Vec<libc::iovec>,
        sqes: &[squeue::Entry],
    ) -> Option<Done> {
        let Some(slot) = self.free.pop() else {
            return Some(Done {
                head,
                status_at,
                status: Status::IoErr,
                used: 1,
            });
        };
        self.slots[slot as usize] = Some(InFlight {
            head,
            status_at,
            plan,
            expected,
            remaining: sqes.len() as u32,
            failed: false,
            hold,
            _iov: iov,
        });
        for sqe in sqes {
            let sqe = sqe.clone().user_data(u64::from(slot));
            loop {
                // SAFETY: the SQE's buffers (the iovec array and the guest
                // pages it points to) live in the slot, held until its
                // completion is reaped.
                if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                    break;
                }
                // The submission queue is full: hand it to the kernel.
                if let Err(e) = self.ring.submit() {
                    warn!(queue = self.index, error = %e, "io_uring submission failed");
                }
                *self.unsubmitted = 0;
            }
            *self.unsubmitted += 1;
        }
        None
    }
}
