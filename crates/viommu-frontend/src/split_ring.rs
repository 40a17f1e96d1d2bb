//! A driver-side split virtqueue, written the way Linux's `virtio_ring.c`
//! writes it: a descriptor table, an avail ring the driver publishes with a
//! Release store after a write barrier, a used ring it polls with Acquire
//! loads, a free list of descriptors, and (with `VIRTIO_RING_F_EVENT_IDX`)
//! `used_event`/`avail_event` notification suppression.
//!
//! Every chain gets a fixed buffer slot of [`SLOT_BYTES`] in guest RAM,
//! picked by its head descriptor; how the request is cut into descriptors
//! is the chain's [`Layout`]. [`SplitRing::add_raw`] posts arbitrary
//! (hostile) descriptors for robustness tests.

use crate::connection::VringAddrs;
use crate::memory::{GuestRam, Mem, MemoryError};
use std::sync::atomic::{Ordering, fence};
use vm_memory::{Bytes, GuestAddress};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used-ring flag: the device does not want kicks.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor.
pub const DESC_LEN: u64 = 16;
/// Guest RAM reserved per chain for its buffers and indirect table.
pub const SLOT_BYTES: u64 = 4096;
/// Where readable pieces start inside a slot.
const READ_AREA: u64 = 0;
/// Where writable pieces start inside a slot.
const WRITE_AREA: u64 = 1536;
/// Where the indirect table sits inside a slot.
const INDIRECT_AREA: u64 = 2560;
/// Most descriptors an indirect table in a slot holds.
pub const MAX_INDIRECT: usize = ((SLOT_BYTES - INDIRECT_AREA) / DESC_LEN) as usize;
/// Bytes left unused between consecutive pieces, so split buffers are not
/// contiguous in memory (a device that assumes contiguity reads garbage).
const GAP: u64 = 8;

/// How a request is cut into descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One readable descriptor, one writable descriptor (Linux's usual).
    Two,
    /// One descriptor per field: head, each body field, and for PROBE the
    /// properties and the tail apart.
    PerField,
    /// A new descriptor every `n` bytes of the readable part and of the
    /// 4-byte tail (1 gives one descriptor per byte; 3 or 5 cut le32/le64
    /// fields in the middle). Also cuts at field boundaries of the
    /// writable part.
    Chunks(usize),
    /// One ring descriptor pointing to an indirect table holding the
    /// [`Layout::PerField`] pieces.
    Indirect,
}

/// One request to post: its readable bytes, its writable size and where
/// to cut them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSpec {
    /// Device-readable bytes, in order.
    pub readable: Vec<u8>,
    /// Size of the device-writable part.
    pub writable_len: usize,
    /// Offsets (strictly inside the readable part) where a new descriptor starts.
    pub readable_cuts: Vec<usize>,
    /// Offsets (strictly inside the writable part) where a new descriptor starts.
    pub writable_cuts: Vec<usize>,
    /// Put the descriptors in an indirect table.
    pub indirect: bool,
    /// Byte the writable part is filled with before posting, so tests see
    /// exactly which bytes the device wrote.
    pub prefill: u8,
}

impl ChainSpec {
    /// A chain for `readable`/`writable_len` cut as `layout` says;
    /// `readable_fields` and `writable_fields` are the field boundaries.
    pub fn with_layout(
        readable: Vec<u8>,
        writable_len: usize,
        layout: Layout,
        readable_fields: &[usize],
        writable_fields: &[usize],
    ) -> ChainSpec {
        let (mut rc, mut wc, indirect) = match layout {
            Layout::Two => (Vec::new(), Vec::new(), false),
            Layout::PerField => (readable_fields.to_vec(), writable_fields.to_vec(), false),
            Layout::Indirect => (readable_fields.to_vec(), writable_fields.to_vec(), true),
            Layout::Chunks(n) => {
                let n = n.max(1);
                let rc = (n..readable.len()).step_by(n).collect();
                let tail_start = writable_len.saturating_sub(4);
                let mut wc: Vec<usize> = writable_fields.to_vec();
                wc.extend((tail_start + n..writable_len).step_by(n));
                (rc, wc, false)
            }
        };
        rc.retain(|&c| c > 0 && c < readable.len());
        rc.sort_unstable();
        rc.dedup();
        wc.retain(|&c| c > 0 && c < writable_len);
        wc.sort_unstable();
        wc.dedup();
        ChainSpec {
            readable,
            writable_len,
            readable_cuts: rc,
            writable_cuts: wc,
            indirect,
            prefill: 0xaa,
        }
    }

    /// The `(offset, length)` pieces of `len` bytes cut at `cuts`, into
    /// `out` (cleared first, so its buffer is reused).
    fn pieces_into(len: usize, cuts: &[usize], out: &mut Vec<(usize, usize)>) {
        out.clear();
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&len)) {
            if c > start {
                out.push((start, c - start));
                start = c;
            }
        }
    }

    /// How many pieces [`Self::pieces_into`] gives, without building them.
    fn piece_count(len: usize, cuts: &[usize]) -> usize {
        let mut start = 0;
        let mut n = 0;
        for &c in cuts.iter().chain(std::iter::once(&len)) {
            if c > start {
                n += 1;
                start = c;
            }
        }
        n
    }
}

/// One descriptor exactly as it sits in a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor when `flags` has NEXT.
    pub next: u16,
}

impl Descriptor {
    fn to_bytes(self) -> [u8; DESC_LEN as usize] {
        let mut b = [0u8; DESC_LEN as usize];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Writes a descriptor table (e.g. an indirect table with a loop) at `at`.
pub fn write_table(mem: &Mem, at: GuestAddress, descs: &[Descriptor]) -> Result<(), RingError> {
    let mut bytes = Vec::with_capacity(descs.len() * DESC_LEN as usize);
    for d in descs {
        bytes.extend_from_slice(&d.to_bytes());
    }
    mem.write_slice(&bytes, at).map_err(|_| RingError::Access {
        what: "descriptor table",
        addr: at.0,
    })
}

/// Where a raw descriptor's `next` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// The following descriptor of the list (NEXT set), or the end for the last one.
    Auto,
    /// The `i`-th descriptor of this list (NEXT set): makes loops.
    ChainIndex(usize),
    /// This raw index (NEXT set), which may be out of the table.
    Id(u16),
}

/// A descriptor for [`SplitRing::add_raw`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address (anything, even outside RAM).
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// WRITE and/or INDIRECT (NEXT is managed by `next`).
    pub flags: u16,
    /// Chaining.
    pub next: RawNext,
}

/// Which ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Allocating the rings or slots.
    #[error("cannot allocate the virtqueue in guest RAM")]
    Alloc(#[from] MemoryError),
    /// The size is not a power of two between 1 and 32768.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    /// Not enough free descriptors.
    #[error("ring full: {need} descriptors needed, {free} free")]
    Full {
        /// Descriptors needed.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The chain does not fit a slot.
    #[error("chain does not fit one {SLOT_BYTES}-byte slot: {0}")]
    TooBig(&'static str),
    /// Guest memory access failed.
    #[error("cannot access the {what} at {addr:#x}")]
    Access {
        /// What was accessed.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// The device put an id in the used ring that is not in flight.
    #[error("device returned descriptor {id} in the used ring, which is not in flight")]
    UnknownHead {
        /// The id.
        id: u32,
    },
    /// The device moved the used index further than there are chains in flight.
    #[error("used index moved by {moved} with only {in_flight} chains in flight")]
    UsedOverrun {
        /// How far used idx moved.
        moved: u16,
        /// Chains the driver had in flight.
        in_flight: usize,
    },
}

/// A chain the device returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the chain.
    pub head: u16,
    /// Used length the device reported.
    pub len: u32,
    /// The whole writable part as it is now (for raw chains: the writable
    /// descriptors that lie inside RAM and are at most a slot long).
    pub writable: Vec<u8>,
}

struct InFlight {
    ids: Vec<u16>,
    writable: Vec<(u64, u32)>,
}

/// The driver's half of one split virtqueue.
pub struct SplitRing {
    addrs: VringAddrs,
    slots: GuestAddress,
    event_idx: bool,
    free: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    /// Buffers reused from one chain to the next, so that posting and
    /// collecting a request allocates (almost) nothing.
    scratch: Scratch,
    /// Where guest RAM's first region is mapped here, to reach the ring and
    /// its buffers without a region lookup per access.
    direct: Option<Direct>,
}

/// Guest RAM's first region as this process maps it.
#[derive(Clone, Copy)]
struct Direct {
    /// Guest-physical start.
    gpa: u64,
    /// Length.
    len: u64,
    /// Host address of `gpa`.
    host: usize,
}

impl Direct {
    fn of(mem: &Mem) -> Option<Direct> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let r = mem.iter().next()?;
        Some(Direct {
            gpa: r.start_addr().0,
            len: r.len(),
            host: r.as_ptr() as usize,
        })
    }

    /// The host address of `[gpa, gpa + len)` if it lies in this region and
    /// `mem` is still the memory this was made from.
    fn at(&self, mem: &Mem, gpa: u64, len: usize) -> Option<*mut u8> {
        let same = Direct::of(mem).is_some_and(|d| d.host == self.host && d.len == self.len);
        let off = gpa.checked_sub(self.gpa)?;
        (same && off.checked_add(len as u64)? <= self.len)
            .then(|| (self.host + off as usize) as *mut u8)
    }
}

/// Copies `data` to `dst` with volatile stores, eight bytes at a time.
///
/// # Safety
///
/// `dst..dst + data.len()` must be mapped and writable.
unsafe fn store_bytes(dst: *mut u8, data: &[u8]) {
    let mut chunks = data.chunks_exact(8);
    let mut at = dst;
    for c in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(c);
        // SAFETY: inside the caller's range; `[u8; 8]` needs no alignment.
        unsafe { std::ptr::write_volatile(at.cast::<[u8; 8]>(), v) };
        // SAFETY: at most one past the end of the caller's range.
        at = unsafe { at.add(8) };
    }
    for (i, &b) in chunks.remainder().iter().enumerate() {
        // SAFETY: the remainder follows the chunks inside the range.
        unsafe { std::ptr::write_volatile(at.add(i), b) };
    }
}

/// Copies from `src` into `buf` with volatile loads, eight bytes at a time.
///
/// # Safety
///
/// `src..src + buf.len()` must be mapped and readable.
unsafe fn load_bytes(src: *const u8, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    let mut at = src;
    for c in &mut chunks {
        // SAFETY: inside the caller's range; `[u8; 8]` needs no alignment.
        c.copy_from_slice(&unsafe { std::ptr::read_volatile(at.cast::<[u8; 8]>()) });
        // SAFETY: at most one past the end of the caller's range.
        at = unsafe { at.add(8) };
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        // SAFETY: the remainder follows the chunks inside the range.
        *b = unsafe { std::ptr::read_volatile(at.add(i)) };
    }
}

#[derive(Default)]
struct Scratch {
    rpieces: Vec<(usize, usize)>,
    wpieces: Vec<(usize, usize)>,
    descs: Vec<Descriptor>,
    /// Chain bookkeeping of chains the device returned, for reuse.
    spare: Vec<InFlight>,
}

fn access(
    what: &'static str,
    addr: GuestAddress,
) -> impl FnOnce(vm_memory::GuestMemoryError) -> RingError {
    move |_| RingError::Access { what, addr: addr.0 }
}

/// Linux's `vring_need_event`: whether moving from `old` to `new` crosses `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl SplitRing {
    /// Allocates a zeroed ring of `size` descriptors and its buffer slots.
    pub fn new(ram: &mut GuestRam, size: u16, event_idx: bool) -> Result<SplitRing, RingError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let n = u64::from(size);
        let desc = ram.alloc(DESC_LEN * n, 16)?;
        let avail = ram.alloc(6 + 2 * n, 2)?;
        let used = ram.alloc(6 + 8 * n, 4)?;
        let slots = ram.alloc(SLOT_BYTES * n, 4096)?;
        Ok(SplitRing {
            addrs: VringAddrs {
                size,
                desc,
                avail,
                used,
            },
            slots,
            event_idx,
            free: (0..size).rev().collect(),
            in_flight: (0..size).map(|_| None).collect(),
            in_flight_count: 0,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            scratch: Scratch::default(),
            direct: Direct::of(ram.mem()),
        })
    }

    /// Entries made available so far (the driver's avail index).
    pub fn published(&self) -> u16 {
        self.avail_idx
    }

    /// Where the ring lives, for SET_VRING_ADDR.
    pub fn addrs(&self) -> VringAddrs {
        self.addrs
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains posted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Descriptors `spec` takes in the ring.
    pub fn descriptors_needed(spec: &ChainSpec) -> usize {
        if spec.indirect {
            1
        } else {
            ChainSpec::piece_count(spec.readable.len(), &spec.readable_cuts)
                + ChainSpec::piece_count(spec.writable_len, &spec.writable_cuts)
        }
    }

    fn slot(&self, head: u16) -> GuestAddress {
        GuestAddress(self.slots.0 + u64::from(head) * SLOT_BYTES)
    }

    /// Writes `data` at `at`: straight into the mapping when it lies in
    /// guest RAM's first region, else through vm-memory.
    fn write_bytes(
        &self,
        mem: &Mem,
        data: &[u8],
        at: GuestAddress,
        what: &'static str,
    ) -> Result<(), RingError> {
        match self.direct.and_then(|d| d.at(mem, at.0, data.len())) {
            // SAFETY: `Direct::at` checked that the range lies in the
            // region `mem` maps, which outlives this call.
            Some(p) => unsafe { store_bytes(p, data) },
            None => mem.write_slice(data, at).map_err(access(what, at))?,
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `at`, as [`Self::write_bytes`] writes.
    fn read_bytes(&self, mem: &Mem, buf: &mut [u8], at: GuestAddress) -> Result<(), RingError> {
        match self.direct.and_then(|d| d.at(mem, at.0, buf.len())) {
            // SAFETY: as in `write_bytes`.
            Some(p) => unsafe { load_bytes(p, buf) },
            None => mem
                .read_slice(buf, at)
                .map_err(access("guest memory", at))?,
        }
        Ok(())
    }

    fn write_desc(&self, mem: &Mem, id: u16, d: Descriptor) -> Result<(), RingError> {
        let at = GuestAddress(self.addrs.desc.0 + u64::from(id) * DESC_LEN);
        self.write_bytes(mem, &d.to_bytes(), at, "descriptor")
    }

    fn take_ids(&mut self, n: usize) -> Result<Vec<u16>, RingError> {
        let mut flight = self.spare_flight();
        self.take_ids_into(n, &mut flight.ids)?;
        Ok(flight.ids)
    }

    /// Bookkeeping for a new chain, reusing a returned chain's buffers.
    fn spare_flight(&mut self) -> InFlight {
        let mut f = self.scratch.spare.pop().unwrap_or(InFlight {
            ids: Vec::new(),
            writable: Vec::new(),
        });
        f.ids.clear();
        f.writable.clear();
        f
    }

    /// Takes `n` free descriptor IDs into `ids` (cleared first), head first.
    fn take_ids_into(&mut self, n: usize, ids: &mut Vec<u16>) -> Result<(), RingError> {
        if n > self.free.len() {
            return Err(RingError::Full {
                need: n,
                free: self.free.len(),
            });
        }
        ids.clear();
        let at = self.free.len() - n;
        ids.extend(self.free.drain(at..).rev());
        Ok(())
    }

    /// Writes a chain's buffers and descriptors and queues its head in the
    /// avail ring (not yet visible to the device: see [`SplitRing::publish`]).
    pub fn add(&mut self, mem: &Mem, spec: &ChainSpec) -> Result<u16, RingError> {
        let mut rpieces = std::mem::take(&mut self.scratch.rpieces);
        let mut wpieces = std::mem::take(&mut self.scratch.wpieces);
        let mut descs = std::mem::take(&mut self.scratch.descs);
        ChainSpec::pieces_into(spec.readable.len(), &spec.readable_cuts, &mut rpieces);
        ChainSpec::pieces_into(spec.writable_len, &spec.writable_cuts, &mut wpieces);
        let added = self.add_pieces(mem, spec, &rpieces, &wpieces, &mut descs);
        self.scratch.rpieces = rpieces;
        self.scratch.wpieces = wpieces;
        self.scratch.descs = descs;
        added
    }

    fn add_pieces(
        &mut self,
        mem: &Mem,
        spec: &ChainSpec,
        rpieces: &[(usize, usize)],
        wpieces: &[(usize, usize)],
        descs: &mut Vec<Descriptor>,
    ) -> Result<u16, RingError> {
        let total = rpieces.len() + wpieces.len();
        if spec.indirect && total > MAX_INDIRECT {
            return Err(RingError::TooBig("too many pieces for the indirect table"));
        }
        if rpieces.iter().map(|p| p.1 as u64 + GAP).sum::<u64>() > WRITE_AREA - READ_AREA {
            return Err(RingError::TooBig("readable part"));
        }
        if wpieces.iter().map(|p| p.1 as u64 + GAP).sum::<u64>() > INDIRECT_AREA - WRITE_AREA {
            return Err(RingError::TooBig("writable part"));
        }
        let mut flight = self.spare_flight();
        if let Err(e) = self.take_ids_into(if spec.indirect { 1 } else { total }, &mut flight.ids) {
            self.scratch.spare.push(flight);
            return Err(e);
        }
        let ids = &flight.ids;
        let head = ids[0];
        let slot = self.slot(head);
        // Buffers: readable pieces, then writable pieces pre-filled.
        descs.clear();
        let mut cursor = slot.0 + READ_AREA;
        for &(off, len) in rpieces {
            let at = GuestAddress(cursor);
            self.write_bytes(mem, &spec.readable[off..off + len], at, "request buffer")?;
            descs.push(Descriptor {
                addr: cursor,
                len: len as u32,
                flags: 0,
                next: 0,
            });
            cursor += len as u64 + GAP;
        }
        let fill = [spec.prefill; 64];
        let mut cursor = slot.0 + WRITE_AREA;
        for &(_, len) in wpieces {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(fill.len());
                let at = GuestAddress(cursor + done as u64);
                self.write_bytes(mem, &fill[..n], at, "reply buffer")?;
                done += n;
            }
            descs.push(Descriptor {
                addr: cursor,
                len: len as u32,
                flags: VRING_DESC_F_WRITE,
                next: 0,
            });
            flight.writable.push((cursor, len as u32));
            cursor += len as u64 + GAP;
        }
        if spec.indirect {
            // Indirect table entries chain by their index in the table.
            let n = descs.len();
            for (i, d) in descs.iter_mut().enumerate() {
                if i + 1 < n {
                    d.flags |= VRING_DESC_F_NEXT;
                    d.next = (i + 1) as u16;
                }
            }
            let table = GuestAddress(slot.0 + INDIRECT_AREA);
            write_table(mem, table, descs)?;
            self.write_desc(
                mem,
                head,
                Descriptor {
                    addr: table.0,
                    len: (n as u64 * DESC_LEN) as u32,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                },
            )?;
        } else {
            let n = descs.len();
            for (i, d) in descs.iter_mut().enumerate() {
                if i + 1 < n {
                    d.flags |= VRING_DESC_F_NEXT;
                    d.next = ids[i + 1];
                }
                self.write_desc(mem, ids[i], *d)?;
            }
        }
        self.queue_head(mem, head, flight)?;
        Ok(head)
    }

    /// Posts raw descriptors as one chain, chained as each `next` says.
    /// Writable descriptors inside RAM and at most a slot long are read
    /// back into [`Used::writable`]. Nothing is validated.
    pub fn add_raw(&mut self, mem: &Mem, raw: &[RawDesc]) -> Result<u16, RingError> {
        if raw.is_empty() {
            return Err(RingError::TooBig("a chain needs at least one descriptor"));
        }
        let ids = self.take_ids(raw.len())?;
        let mut writable = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let (flags, next) = match r.next {
                RawNext::Auto if i + 1 < raw.len() => (VRING_DESC_F_NEXT, ids[i + 1]),
                RawNext::Auto => (0, 0),
                RawNext::ChainIndex(j) => {
                    (VRING_DESC_F_NEXT, ids.get(j).copied().unwrap_or(j as u16))
                }
                RawNext::Id(id) => (VRING_DESC_F_NEXT, id),
            };
            let d = Descriptor {
                addr: r.addr,
                len: r.len,
                flags: (r.flags & !VRING_DESC_F_NEXT) | flags,
                next,
            };
            self.write_desc(mem, ids[i], d)?;
            if r.flags & VRING_DESC_F_WRITE != 0 && u64::from(r.len) <= SLOT_BYTES {
                writable.push((r.addr, r.len));
            }
        }
        let head = ids[0];
        self.queue_head(mem, head, InFlight { ids, writable })?;
        Ok(head)
    }

    fn queue_head(&mut self, mem: &Mem, head: u16, flight: InFlight) -> Result<(), RingError> {
        let pos = u64::from(self.avail_idx & (self.addrs.size - 1));
        let at = GuestAddress(self.addrs.avail.0 + 4 + 2 * pos);
        self.write_bytes(mem, &head.to_le_bytes(), at, "avail ring")?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if let Some(slot) = self.in_flight.get_mut(usize::from(head)) {
            *slot = Some(flight);
            self.in_flight_count += 1;
        }
        Ok(())
    }

    /// Makes every queued head visible (write barrier, then a Release store
    /// of `avail->idx`) and says whether the device wants a kick, as
    /// Linux's `virtqueue_kick_prepare` decides (full barrier, then
    /// `avail_event` with EVENT_IDX, else the used ring's NO_NOTIFY flag).
    pub fn publish(&mut self, mem: &Mem) -> Result<bool, RingError> {
        fence(Ordering::Release);
        let idx_at = GuestAddress(self.addrs.avail.0 + 2);
        mem.store(self.avail_idx, idx_at, Ordering::Release)
            .map_err(access("avail index", idx_at))?;
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if new == old {
            return Ok(false);
        }
        if self.event_idx {
            let at = GuestAddress(self.addrs.used.0 + 4 + 8 * u64::from(self.addrs.size));
            let event: u16 = mem
                .load(at, Ordering::Acquire)
                .map_err(access("avail_event", at))?;
            Ok(need_event(event, new, old))
        } else {
            let at = self.addrs.used;
            let flags: u16 = mem
                .load(at, Ordering::Acquire)
                .map_err(access("used flags", at))?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &Mem) -> Result<u16, RingError> {
        let at = GuestAddress(self.addrs.used.0 + 2);
        mem.load(at, Ordering::Acquire)
            .map_err(access("used index", at))
    }

    /// Whether the device returned chains not yet popped.
    pub fn has_used(&self, mem: &Mem) -> Result<bool, RingError> {
        Ok(self.used_idx(mem)? != self.last_used)
    }

    /// With EVENT_IDX: asks for an interrupt once `count` more chains are
    /// used (writes `used_event`, then a full barrier). Without: nothing.
    pub fn arm_used_event(&mut self, mem: &Mem, count: u16) -> Result<(), RingError> {
        if !self.event_idx {
            return Ok(());
        }
        let at = GuestAddress(self.addrs.avail.0 + 4 + 2 * u64::from(self.addrs.size));
        let event = self.last_used.wrapping_add(count.max(1)).wrapping_sub(1);
        mem.store(event, at, Ordering::Release)
            .map_err(access("used_event", at))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Takes the next used chain, if any, reads its writable part back and
    /// returns its descriptors to the free list.
    pub fn pop_used(&mut self, mem: &Mem) -> Result<Option<Used>, RingError> {
        let used_idx = self.used_idx(mem)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let moved = used_idx.wrapping_sub(self.last_used);
        if usize::from(moved) > self.in_flight_count {
            return Err(RingError::UsedOverrun {
                moved,
                in_flight: self.in_flight_count,
            });
        }
        let pos = u64::from(self.last_used & (self.addrs.size - 1));
        let at = GuestAddress(self.addrs.used.0 + 4 + 8 * pos);
        let mut elem = [0u8; 8];
        self.read_bytes(mem, &mut elem, at)
            .map_err(|_| RingError::Access {
                what: "used element",
                addr: at.0,
            })?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        let flight = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or(RingError::UnknownHead { id })?;
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight_count -= 1;
        let mut writable = Vec::with_capacity(flight.writable.iter().map(|w| w.1 as usize).sum());
        for &(addr, l) in &flight.writable {
            let start = writable.len();
            writable.resize(start + l as usize, 0);
            if self
                .read_bytes(mem, &mut writable[start..], GuestAddress(addr))
                .is_err()
            {
                writable.truncate(start);
            }
        }
        self.free.extend(flight.ids.iter().rev());
        self.scratch.spare.push(flight);
        Ok(Some(Used {
            head: id as u16,
            len,
            writable,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_linux() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(4, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(0xffff, 0, 0xfffe), "wraps");
    }

    #[test]
    fn layouts_cut_where_they_say() {
        let r: Vec<u8> = (0..36).collect();
        let fields = [4, 8, 16, 24, 32];
        let two = ChainSpec::with_layout(r.clone(), 4, Layout::Two, &fields, &[]);
        assert!(two.readable_cuts.is_empty() && two.writable_cuts.is_empty());
        assert_eq!(SplitRing::descriptors_needed(&two), 2);
        let pf = ChainSpec::with_layout(r.clone(), 4, Layout::PerField, &fields, &[]);
        assert_eq!(SplitRing::descriptors_needed(&pf), 7);
        let c1 = ChainSpec::with_layout(r.clone(), 4, Layout::Chunks(1), &fields, &[]);
        assert_eq!(SplitRing::descriptors_needed(&c1), 40);
        let c5 = ChainSpec::with_layout(r.clone(), 516, Layout::Chunks(5), &fields, &[512]);
        assert_eq!(c5.readable_cuts, vec![5, 10, 15, 20, 25, 30, 35]);
        assert_eq!(c5.writable_cuts, vec![512]);
        let ind = ChainSpec::with_layout(r, 4, Layout::Indirect, &fields, &[]);
        assert!(ind.indirect);
        assert_eq!(SplitRing::descriptors_needed(&ind), 1);
    }

    #[test]
    fn chains_are_written_as_linux_writes_them() {
        let mut ram = GuestRam::new(8 << 20).unwrap();
        let mut ring = SplitRing::new(&mut ram, 8, false).unwrap();
        let mem = ram.mem();
        let spec = ChainSpec::with_layout(vec![1, 2, 3, 4, 5, 6], 4, Layout::PerField, &[4], &[]);
        let head = ring.add(mem, &spec).unwrap();
        assert_eq!(ring.free_descriptors(), 5);
        // Not visible before publish.
        let idx: u16 = mem
            .read_obj(GuestAddress(ring.addrs().avail.0 + 2))
            .unwrap();
        assert_eq!(idx, 0);
        assert!(ring.publish(mem).unwrap(), "no NO_NOTIFY flag: kick");
        assert!(!ring.publish(mem).unwrap(), "nothing new: no kick");
        let idx: u16 = mem
            .read_obj(GuestAddress(ring.addrs().avail.0 + 2))
            .unwrap();
        assert_eq!(idx, 1);
        // Descriptor 0: 4 readable bytes, NEXT.
        let mut d = [0u8; 16];
        let desc0 = GuestAddress(ring.addrs().desc.0 + 16 * u64::from(head));
        mem.read_slice(&mut d, desc0).unwrap();
        assert_eq!(u32::from_le_bytes([d[8], d[9], d[10], d[11]]), 4);
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), VRING_DESC_F_NEXT);
        // Play the device: write a tail, mark used.
        let tail_desc = {
            let mut id = head;
            for _ in 0..2 {
                let at = GuestAddress(ring.addrs().desc.0 + 16 * u64::from(id));
                mem.read_slice(&mut d, at).unwrap();
                id = u16::from_le_bytes([d[14], d[15]]);
            }
            let at = GuestAddress(ring.addrs().desc.0 + 16 * u64::from(id));
            mem.read_slice(&mut d, at).unwrap();
            u64::from_le_bytes(d[0..8].try_into().unwrap())
        };
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), VRING_DESC_F_WRITE);
        mem.write_slice(&[0, 0, 0, 0], GuestAddress(tail_desc))
            .unwrap();
        let used = ring.addrs().used;
        mem.write_obj(u32::from(head), GuestAddress(used.0 + 4))
            .unwrap();
        mem.write_obj(4u32, GuestAddress(used.0 + 8)).unwrap();
        assert!(ring.pop_used(mem).unwrap().is_none(), "idx not moved yet");
        mem.write_obj(1u16, GuestAddress(used.0 + 2)).unwrap();
        let u = ring.pop_used(mem).unwrap().unwrap();
        assert_eq!((u.head, u.len, u.writable), (head, 4, vec![0, 0, 0, 0]));
        assert_eq!(ring.free_descriptors(), 8);
        assert_eq!(ring.in_flight(), 0);
        // A used index running ahead of what is in flight is caught.
        mem.write_obj(3u16, GuestAddress(used.0 + 2)).unwrap();
        assert!(matches!(
            ring.pop_used(mem),
            Err(RingError::UsedOverrun { .. })
        ));
    }

    #[test]
    fn full_ring_and_oversized_chains_are_refused() {
        let mut ram = GuestRam::new(8 << 20).unwrap();
        assert!(SplitRing::new(&mut ram, 3, false).is_err());
        let mut ring = SplitRing::new(&mut ram, 2, true).unwrap();
        let mem = ram.mem();
        let spec = ChainSpec::with_layout(vec![0; 36], 4, Layout::PerField, &[4, 8], &[]);
        assert!(matches!(ring.add(mem, &spec), Err(RingError::Full { .. })));
        let big = ChainSpec::with_layout(vec![0; 4000], 4, Layout::Two, &[], &[]);
        assert!(matches!(ring.add(mem, &big), Err(RingError::TooBig(_))));
        let raw = [RawDesc {
            addr: u64::MAX - 3,
            len: 4,
            flags: VRING_DESC_F_WRITE,
            next: RawNext::ChainIndex(0),
        }];
        ring.add_raw(mem, &raw).unwrap();
        assert_eq!(ring.in_flight(), 1);
    }
}
