//! The device side of a split virtqueue whose rings and buffers live at
//! device addresses (IOVAs under an IOMMU), read and written through a
//! [`Batch`]: the three rings are translated once per batch, every ring
//! access is a volatile load or store through those host addresses.
//!
//! Under ACCESS_PLATFORM a stock VMM hands ring addresses over as its own
//! host address of "guest-physical = IOVA"; vhost-user-backend turns them
//! back into guest-physical addresses through the memory table, which are
//! then the rings' IOVAs — what [`RingAddrs`] holds here.

use std::sync::atomic::{AtomicU16, Ordering, fence};

use iotlb_shm::Access;

use crate::dma::Batch;
use crate::error::DmaError;

/// Memory a queue's rings and buffers live in, as host addresses of device
/// ranges: a [`Batch`] (translated), or [`crate::guest::RamAccess`] (guest
/// RAM as it is, for a device that sits in front of no IOMMU).
pub trait RingMemory {
    /// The host address of the device range `[addr, addr + len)`, which
    /// must be contiguous in host memory and allow `access`.
    fn host_range(&self, addr: u64, len: u64, access: Access) -> Result<*mut u8, DmaError>;
}

impl RingMemory for Batch<'_> {
    fn host_range(&self, addr: u64, len: u64, access: Access) -> Result<*mut u8, DmaError> {
        Batch::host_range(self, addr, len, access)
    }
}

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest queue size (virtio 1.2).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most descriptors an indirect table may hold here.
const MAX_INDIRECT: u32 = 4096;

/// Where a queue's rings are (device addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Queue size (a power of two ≤ 32768).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// Why the queue cannot go on; the queue stops until it is set up again.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The queue's set-up is impossible (size, alignment).
    #[error("bad queue set-up: {0}")]
    Setup(&'static str),
    /// A ring could not be reached.
    #[error("ring memory")]
    Memory(#[from] DmaError),
    /// The driver published more entries than the queue holds.
    #[error("avail index {avail} is {ahead} entries ahead of {next}")]
    AvailAhead {
        /// The driver's index.
        avail: u16,
        /// The device's next entry.
        next: u16,
        /// How far ahead.
        ahead: u16,
    },
    /// A head or next index outside the table.
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    /// The chain loops or is longer than the queue.
    #[error("descriptor chain loops or exceeds the queue size")]
    Loop,
    /// A malformed indirect descriptor.
    #[error("bad indirect descriptor: {0}")]
    BadIndirect(&'static str),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Device address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A descriptor chain taken off the available ring.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    /// Head index (what the used entry names).
    pub head: u16,
    /// Its buffers in order.
    pub segments: Vec<Segment>,
    /// Why the chain cannot be used (a loop, an index out of range, a bad
    /// indirect table): return it with used length 0. `segments` is then
    /// incomplete.
    pub malformed: Option<RingError>,
}

/// The device's state of one split virtqueue.
#[derive(Debug, Clone)]
pub struct SplitQueue {
    addrs: RingAddrs,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    /// The used index when the driver was last notified.
    signalled_used: Option<u16>,
    /// `next_used` is still to be read from the used ring (see [`Self::new`]).
    used_unknown: bool,
}

impl SplitQueue {
    /// A queue at `addrs`, resuming at `next_avail` (SET_VRING_BASE) and
    /// at the used index found in the used ring when it is first reached.
    ///
    /// vhost-user carries no used index: a backend resumes where the used
    /// ring says (as QEMU's libvhost-user does). The framework's own copy
    /// cannot be used under an IOMMU: vhost-user-backend reads it at
    /// SET_VRING_ADDR from the ring address taken as guest-physical, which
    /// is really an IOVA, so it reads some unrelated guest page.
    pub fn new(
        addrs: RingAddrs,
        next_avail: u16,
        event_idx: bool,
    ) -> Result<SplitQueue, RingError> {
        if !addrs.size.is_power_of_two() || addrs.size > MAX_QUEUE_SIZE {
            return Err(RingError::Setup(
                "queue size is not a power of two up to 32768",
            ));
        }
        if addrs.desc % 16 != 0 || addrs.avail % 2 != 0 || addrs.used % 4 != 0 {
            return Err(RingError::Setup("misaligned ring"));
        }
        Ok(SplitQueue {
            addrs,
            next_avail,
            next_used: 0,
            event_idx,
            signalled_used: None,
            used_unknown: true,
        })
    }

    /// A queue at `addrs` whose indices are both known: a device that
    /// reads its rings at guest-physical addresses takes the used index
    /// that its transport read at SET_VRING_ADDR.
    pub fn resume(
        addrs: RingAddrs,
        next_avail: u16,
        next_used: u16,
        event_idx: bool,
    ) -> Result<SplitQueue, RingError> {
        let mut q = SplitQueue::new(addrs, next_avail, event_idx)?;
        q.next_used = next_used;
        q.used_unknown = false;
        Ok(q)
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Next available entry to take.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Next used entry to write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// The rings.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// The rings of this batch.
    pub fn view<'v, M: RingMemory>(
        &'v mut self,
        batch: &'v M,
    ) -> Result<RingView<'v, M>, RingError> {
        let n = u64::from(self.addrs.size);
        let desc = batch.host_range(self.addrs.desc, 16 * n, Access::READ)?;
        let avail = batch.host_range(self.addrs.avail, 6 + 2 * n, Access::READ)?;
        let used = batch.host_range(self.addrs.used, 6 + 8 * n, Access::READ_WRITE)?;
        if desc as usize % 16 != 0 || avail as usize % 2 != 0 || used as usize % 4 != 0 {
            return Err(RingError::Setup("misaligned ring in host memory"));
        }
        let view = RingView {
            q: self,
            batch,
            desc,
            avail,
            used,
        };
        if view.q.used_unknown {
            let idx = u16::from_le(view.atomic_u16(view.used, 2).load(Ordering::Acquire));
            view.q.next_used = idx;
            view.q.used_unknown = false;
        }
        Ok(view)
    }
}

/// The rings of a queue, translated for one batch.
pub struct RingView<'v, M: RingMemory = Batch<'v>> {
    q: &'v mut SplitQueue,
    batch: &'v M,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
}

impl<M: RingMemory> RingView<'_, M> {
    fn size(&self) -> u16 {
        self.q.addrs.size
    }

    fn load_u16(&self, base: *mut u8, offset: usize) -> u16 {
        // SAFETY: `offset` lies inside the ring translated in `view` (the
        // callers index below its size) and is 2-aligned; guest memory is
        // shared with the guest, hence volatile.
        u16::from_le(unsafe { std::ptr::read_volatile(base.add(offset).cast::<u16>()) })
    }

    fn atomic_u16(&self, base: *mut u8, offset: usize) -> &AtomicU16 {
        // SAFETY: 2-aligned (checked in `view`, offsets even) inside a ring
        // mapped for this batch; the index words are shared with the guest
        // and accessed atomically here.
        unsafe { AtomicU16::from_ptr(base.add(offset).cast::<u16>()) }
    }

    /// The driver's available index (Acquire: the entries before it are
    /// visible after this load).
    fn avail_idx(&self) -> u16 {
        u16::from_le(self.atomic_u16(self.avail, 2).load(Ordering::Acquire))
    }

    /// Next available entry to take.
    pub fn next_avail(&self) -> u16 {
        self.q.next_avail
    }

    /// Next used entry to write.
    pub fn next_used(&self) -> u16 {
        self.q.next_used
    }

    /// Whether the driver has published entries not taken yet.
    pub fn has_available(&self) -> bool {
        self.avail_idx() != self.q.next_avail
    }

    fn descriptor(table: *mut u8, i: u16) -> (u64, u32, u16, u16) {
        // SAFETY: the callers bound `i` below the table's entry count; the
        // table is mapped for this batch; a byte array needs no alignment.
        let d: [u8; 16] =
            unsafe { std::ptr::read_volatile(table.add(16 * usize::from(i)).cast::<[u8; 16]>()) };
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                d[o],
                d[o + 1],
                d[o + 2],
                d[o + 3],
                d[o + 4],
                d[o + 5],
                d[o + 6],
                d[o + 7],
            ])
        };
        (
            u64_at(0),
            u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
            u16::from_le_bytes([d[12], d[13]]),
            u16::from_le_bytes([d[14], d[15]]),
        )
    }

    /// Takes the next available chain into `chain`; `Ok(false)` when the
    /// ring is empty. A chain that cannot be walked is taken with
    /// [`Chain::malformed`] set (return it with used length 0); only a ring
    /// that cannot be read sanely (an index ahead of the queue, a head out of
    /// range) is an error, which stops the queue.
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool, RingError> {
        let avail = self.avail_idx();
        if avail == self.q.next_avail {
            return Ok(false);
        }
        let ahead = avail.wrapping_sub(self.q.next_avail);
        if ahead > self.size() {
            return Err(RingError::AvailAhead {
                avail,
                next: self.q.next_avail,
                ahead,
            });
        }
        let slot = usize::from(self.q.next_avail % self.size());
        let head = self.load_u16(self.avail, 4 + 2 * slot);
        if head >= self.size() {
            return Err(RingError::BadIndex(head));
        }
        chain.head = head;
        chain.segments.clear();
        chain.malformed = self.walk(head, chain).err();
        self.q.next_avail = self.q.next_avail.wrapping_add(1);
        Ok(true)
    }

    /// Puts the chain taken last back (it will be taken again): for a
    /// request that cannot start yet for want of a resource held by I/O in
    /// flight. Only the last [`Self::pop`] can be undone, once.
    pub fn unpop(&mut self) {
        self.rewind(1);
    }

    /// Puts the last `count` chains taken back, in order (they will be
    /// taken again): for a device that takes several chains for one piece
    /// of work (a frame over merged receive buffers) and finds too few.
    /// No used entry may have been written for them.
    pub fn rewind(&mut self, count: u16) {
        self.q.next_avail = self.q.next_avail.wrapping_sub(count);
    }

    /// Entries the driver has published and the device not taken yet.
    pub fn available(&self) -> u16 {
        self.avail_idx().wrapping_sub(self.q.next_avail)
    }

    fn walk(&self, head: u16, chain: &mut Chain) -> Result<(), RingError> {
        let mut index = head;
        let mut count = 0u16;
        loop {
            count += 1;
            if count > self.size() {
                return Err(RingError::Loop);
            }
            let (addr, len, flags, next) = Self::descriptor(self.desc, index);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if flags & VRING_DESC_F_NEXT != 0 {
                    return Err(RingError::BadIndirect("INDIRECT together with NEXT"));
                }
                return self.indirect(addr, len, chain);
            }
            chain.segments.push(Segment {
                addr,
                len,
                writable: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if next >= self.size() {
                return Err(RingError::BadIndex(next));
            }
            index = next;
        }
    }

    fn indirect(&self, addr: u64, len: u32, chain: &mut Chain) -> Result<(), RingError> {
        if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT {
            return Err(RingError::BadIndirect("table length"));
        }
        let entries = (len / 16) as u16;
        let table = self.batch.host_range(addr, u64::from(len), Access::READ)?;
        let mut index = 0u16;
        let mut count = 0u16;
        loop {
            count += 1;
            if count > entries {
                return Err(RingError::Loop);
            }
            let (addr, len, flags, next) = Self::descriptor(table, index);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(RingError::BadIndirect("nested indirect table"));
            }
            chain.segments.push(Segment {
                addr,
                len,
                writable: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if next >= entries {
                return Err(RingError::BadIndex(next));
            }
            index = next;
        }
    }

    /// Writes a used entry (not visible to the driver until
    /// [`Self::publish_used`]).
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.q.next_used % self.size());
        let mut entry = [0u8; 8];
        entry[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        entry[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: the entry lies inside the used ring mapped for this batch
        // (slot < size); a byte array needs no alignment.
        unsafe { std::ptr::write_volatile(self.used.add(4 + 8 * slot).cast::<[u8; 8]>(), entry) };
        self.q.next_used = self.q.next_used.wrapping_add(1);
    }

    /// Makes every used entry written so far visible (Release store of the
    /// used index).
    pub fn publish_used(&mut self) {
        self.atomic_u16(self.used, 2)
            .store(self.q.next_used.to_le(), Ordering::Release);
    }

    /// Whether the driver wants to be notified of the used entries
    /// published since it was last notified (EVENT_IDX, or its
    /// NO_INTERRUPT flag).
    pub fn needs_notification(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let new = self.q.next_used;
        if !self.q.event_idx {
            return self.load_u16(self.avail, 0) & VRING_AVAIL_F_NO_INTERRUPT == 0;
        }
        let used_event = self.load_u16(self.avail, 4 + 2 * usize::from(self.size()));
        let old = self.q.signalled_used.replace(new);
        match old {
            None => true,
            Some(old) => new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old),
        }
    }

    /// Asks the driver not to kick (until [`Self::enable_notification`]).
    pub fn disable_notification(&mut self) {
        if !self.q.event_idx {
            let flags = self.atomic_u16(self.used, 0);
            flags.store(VRING_USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
    }

    /// Asks the driver to kick for the next entry; true if entries arrived
    /// meanwhile (process them before sleeping).
    pub fn enable_notification(&mut self) -> bool {
        if self.q.event_idx {
            let at = 4 + 8 * usize::from(self.size());
            self.atomic_u16(self.used, at)
                .store(self.q.next_avail.to_le(), Ordering::Relaxed);
        } else {
            self.atomic_u16(self.used, 0).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.has_available()
    }
}
