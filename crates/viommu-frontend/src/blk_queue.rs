//! The driver side of one virtio-blk virtqueue, as Linux's virtio_ring
//! writes it for virtio-blk: each request is a chain of a 16-byte header
//! (device-readable), its data buffers, and a 1-byte status
//! (device-writable), at device addresses (IOVAs under an IOMMU) chosen by
//! the caller; the rings live in guest RAM at guest-physical addresses and
//! are seen by the device at their own device addresses.
//!
//! [`BlkQueue`] itself knows nothing of virtio-blk but [`BlkQueue::post`]:
//! it serves any device's queue (the virtio-net queues of [`crate::net`]).

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress};

use crate::connection::VringAddrs;
use crate::memory::{GuestRam, Mem, MemoryError};
use crate::split_ring::{
    DESC_LEN, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, need_event,
};

/// A buffer as the driver places it: where the device sees it, where the
/// guest has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Device address (IOVA, or guest-physical without an IOMMU).
    pub dev: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// One virtio-blk request to post.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// The 16-byte header's buffer.
    pub header: Buf,
    /// Data buffers, and whether the device writes them.
    pub data: Vec<(Buf, bool)>,
    /// The status byte's buffer (1 byte).
    pub status: Buf,
}

/// One descriptor of [`BlkQueue::post_raw`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address (device view).
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// `VRING_DESC_F_*` (NEXT comes from `next`).
    pub flags: u16,
    /// Index in the posted slice of the next descriptor.
    pub next: Option<usize>,
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag given at [`BlkQueue::post`].
    pub tag: usize,
    /// Used length the device reported.
    pub used_len: u32,
}

/// A ring failure (the device broke the protocol, or memory).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Writing or reading the ring failed.
    #[error("ring access at {0:#x}")]
    Access(u64),
    /// Not enough free descriptors.
    #[error("queue full: {need} descriptors needed, {free} free")]
    Full {
        /// Needed.
        need: usize,
        /// Free.
        free: usize,
    },
    /// The device returned a head that is not in flight.
    #[error("the device returned head {0}, which is not in flight")]
    UnknownHead(u32),
    /// The device moved the used index past what is in flight.
    #[error("the used index moved by {moved} with {in_flight} requests in flight")]
    Overrun {
        /// Movement.
        moved: u16,
        /// In flight.
        in_flight: usize,
    },
}

/// The driver side of one virtio-blk queue.
pub struct BlkQueue {
    /// Rings at guest-physical addresses.
    gpa: VringAddrs,
    /// The rings at the device's addresses.
    dev: VringAddrs,
    event_idx: bool,
    free: Vec<u16>,
    in_flight: Vec<Option<(usize, Vec<u16>)>>,
    in_flight_count: usize,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
}

impl BlkQueue {
    /// Allocates the rings of a `size`-entry queue in guest RAM. Their
    /// device addresses are the guest-physical ones until
    /// [`Self::set_device_addrs`].
    pub fn new(ram: &mut GuestRam, size: u16, event_idx: bool) -> Result<BlkQueue, QueueError> {
        let n = u64::from(size);
        // Each ring on pages of its own, so it can be mapped on its own.
        let desc = ram.alloc(DESC_LEN * n, 4096)?;
        let avail = ram.alloc(6 + 2 * n, 4096)?;
        let used = ram.alloc(6 + 8 * n, 4096)?;
        let gpa = VringAddrs {
            size,
            desc,
            avail,
            used,
        };
        Ok(BlkQueue {
            gpa,
            dev: gpa,
            event_idx,
            free: (0..size).rev().collect(),
            in_flight: (0..size).map(|_| None).collect(),
            in_flight_count: 0,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        })
    }

    /// The rings' guest-physical addresses.
    pub fn gpa_addrs(&self) -> VringAddrs {
        self.gpa
    }

    /// The rings' device addresses (what the VMM hands the backend).
    pub fn device_addrs(&self) -> VringAddrs {
        self.dev
    }

    /// Sets the rings' device addresses (IOVAs they were mapped at).
    pub fn set_device_addrs(&mut self, dev: VringAddrs) {
        self.dev = dev;
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn write_desc(
        &self,
        mem: &Mem,
        id: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), QueueError> {
        let at = GuestAddress(self.gpa.desc.0 + u64::from(id) * DESC_LEN);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, at)
            .map_err(|_| QueueError::Access(at.0))
    }

    /// Writes the request's header and a 0xff status (so a status the
    /// device never wrote shows), chains its buffers and queues it (not yet
    /// visible: [`Self::publish`]).
    pub fn post(&mut self, mem: &Mem, req: &BlkRequest, tag: usize) -> Result<u16, QueueError> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&req.kind.to_le_bytes());
        header[8..].copy_from_slice(&req.sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(req.header.gpa))
            .map_err(|_| QueueError::Access(req.header.gpa))?;
        mem.write_slice(&[0xff], GuestAddress(req.status.gpa))
            .map_err(|_| QueueError::Access(req.status.gpa))?;
        let mut bufs = Vec::with_capacity(req.data.len() + 2);
        bufs.push((req.header, false));
        bufs.extend(req.data.iter().copied());
        bufs.push((req.status, true));
        self.post_chain(mem, &bufs, tag)
    }

    /// Queues a chain of any buffers in this order (`true`: device-writable),
    /// whatever they hold: for odd and hostile layouts.
    pub fn post_chain(
        &mut self,
        mem: &Mem,
        bufs: &[(Buf, bool)],
        tag: usize,
    ) -> Result<u16, QueueError> {
        let raw: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, (b, writes))| RawDesc {
                addr: b.dev,
                len: b.len,
                flags: if *writes { VRING_DESC_F_WRITE } else { 0 },
                next: (i + 1 < bufs.len()).then_some(i + 1),
            })
            .collect();
        self.post_raw(mem, &raw, tag)
    }

    /// Queues descriptors exactly as given: `next` is an index into `raw`
    /// (`Some(j)`: NEXT set, pointing at `raw[j]`'s descriptor, which may
    /// form a loop); `flags` other than NEXT are written as they are (WRITE,
    /// INDIRECT). The head is `raw[0]`.
    pub fn post_raw(&mut self, mem: &Mem, raw: &[RawDesc], tag: usize) -> Result<u16, QueueError> {
        let n = raw.len().max(1);
        if n > self.free.len() {
            return Err(QueueError::Full {
                need: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut ids = self.free.split_off(at);
        ids.reverse();
        for (i, d) in raw.iter().enumerate() {
            let (flags, next) = match d.next {
                Some(j) => (
                    d.flags | VRING_DESC_F_NEXT,
                    ids.get(j).copied().unwrap_or(j as u16),
                ),
                None => (d.flags & !VRING_DESC_F_NEXT, 0),
            };
            self.write_desc(mem, ids[i], d.addr, d.len, flags, next)?;
        }
        let head = ids[0];
        let pos = u64::from(self.avail_idx & (self.gpa.size - 1));
        let slot = GuestAddress(self.gpa.avail.0 + 4 + 2 * pos);
        mem.write_obj(head, slot)
            .map_err(|_| QueueError::Access(slot.0))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight[usize::from(head)] = Some((tag, ids));
        self.in_flight_count += 1;
        Ok(head)
    }

    /// Publishes the posted requests; true if the device wants a kick.
    pub fn publish(&mut self, mem: &Mem) -> Result<bool, QueueError> {
        fence(Ordering::Release);
        let idx_at = GuestAddress(self.gpa.avail.0 + 2);
        mem.store(self.avail_idx, idx_at, Ordering::Release)
            .map_err(|_| QueueError::Access(idx_at.0))?;
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if new == old {
            return Ok(false);
        }
        if self.event_idx {
            let at = GuestAddress(self.gpa.used.0 + 4 + 8 * u64::from(self.gpa.size));
            let event: u16 = mem
                .load(at, Ordering::Acquire)
                .map_err(|_| QueueError::Access(at.0))?;
            Ok(need_event(event, new, old))
        } else {
            let flags: u16 = mem
                .load(self.gpa.used, Ordering::Acquire)
                .map_err(|_| QueueError::Access(self.gpa.used.0))?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Asks for a call once the next used entry is published (EVENT_IDX);
    /// without EVENT_IDX the device calls anyway.
    pub fn arm(&mut self, mem: &Mem) -> Result<(), QueueError> {
        if self.event_idx {
            let at = GuestAddress(self.gpa.avail.0 + 4 + 2 * u64::from(self.gpa.size));
            mem.store(self.last_used, at, Ordering::Release)
                .map_err(|_| QueueError::Access(at.0))?;
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether the device published used entries not taken yet.
    pub fn has_used(&self, mem: &Mem) -> Result<bool, QueueError> {
        let at = GuestAddress(self.gpa.used.0 + 2);
        let idx: u16 = mem
            .load(at, Ordering::Acquire)
            .map_err(|_| QueueError::Access(at.0))?;
        Ok(idx != self.last_used)
    }

    /// Takes the next used entry.
    pub fn pop(&mut self, mem: &Mem) -> Result<Option<Completion>, QueueError> {
        let at = GuestAddress(self.gpa.used.0 + 2);
        let idx: u16 = mem
            .load(at, Ordering::Acquire)
            .map_err(|_| QueueError::Access(at.0))?;
        if idx == self.last_used {
            return Ok(None);
        }
        let moved = idx.wrapping_sub(self.last_used);
        if usize::from(moved) > self.in_flight_count {
            return Err(QueueError::Overrun {
                moved,
                in_flight: self.in_flight_count,
            });
        }
        let pos = u64::from(self.last_used & (self.gpa.size - 1));
        let e = GuestAddress(self.gpa.used.0 + 4 + 8 * pos);
        let mut elem = [0u8; 8];
        mem.read_slice(&mut elem, e)
            .map_err(|_| QueueError::Access(e.0))?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let used_len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        let (tag, ids) = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or(QueueError::UnknownHead(id))?;
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight_count -= 1;
        self.free.extend(ids.iter().rev());
        Ok(Some(Completion { tag, used_len }))
    }
}
