//! The event queue: fault records waiting for driver-posted buffers.
//!
//! Faults are queued (bounded: the oldest is dropped and counted when the
//! queue is full) and written one per buffer as the driver posts buffers.
//! A buffer too small for the 24-byte record is returned with used length 0
//! and the fault is dropped and counted: a record is never spread over
//! several buffers (DEV-FAULT-5). Nothing here ever blocks the request
//! queue (DEV-FAULT-7).

use crate::chain::ChainParts;
use std::collections::VecDeque;
use viommu_backend::RamAccess;
use virtio_iommu_proto::FaultRecord;
use virtio_iommu_proto::fault::FAULT_RECORD_LEN;

/// Faults kept while the driver has posted no buffer.
pub const MAX_PENDING_FAULTS: usize = 256;

/// Counters of the event queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Records written to the driver.
    pub delivered: u64,
    /// Records dropped because too many were pending.
    pub dropped_full: u64,
    /// Records dropped because the driver's buffer was too small or bad.
    pub dropped_buffer: u64,
}

/// Faults waiting for buffers.
#[derive(Debug, Default)]
pub struct FaultQueue {
    pending: VecDeque<FaultRecord>,
    /// Counters.
    pub stats: FaultStats,
    parts: ChainParts,
}

impl FaultQueue {
    /// Queues a fault, dropping the oldest one if the queue is full.
    pub(crate) fn push(&mut self, record: FaultRecord) {
        if self.pending.len() == MAX_PENDING_FAULTS {
            self.pending.pop_front();
            self.stats.dropped_full += 1;
        }
        self.pending.push_back(record);
    }

    /// Drops every record not delivered yet (the device was reset: they
    /// belong to a driver that is gone).
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.pending();
        self.pending.clear();
        n
    }

    /// The records waiting, oldest first (saved with the device state).
    pub(crate) fn records(&self) -> Vec<FaultRecord> {
        self.pending.iter().copied().collect()
    }

    /// Faults waiting.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes the oldest pending fault into one event buffer, given as its
    /// descriptors `(addr, len, device_writable)`; returns the used length
    /// for the buffer, or `None` if no fault is pending (the buffer must
    /// then stay with the device).
    pub(crate) fn fill(
        &mut self,
        mem: &RamAccess,
        descriptors: impl Iterator<Item = (u64, u32, bool)>,
    ) -> Option<u32> {
        let record = self.pending.pop_front()?;
        self.parts.clear();
        let mut shape_ok = true;
        for (addr, len, w) in descriptors {
            if self.parts.push(addr, len, w).is_err() {
                shape_ok = false;
                break;
            }
        }
        let fits = shape_ok
            && self.parts.readable_len() == 0
            && self.parts.writable_len() >= FAULT_RECORD_LEN as u64;
        if fits && self.parts.scatter(mem, &record.to_bytes()).is_ok() {
            self.stats.delivered += 1;
            Some(FAULT_RECORD_LEN as u32)
        } else {
            self.stats.dropped_buffer += 1;
            Some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use virtio_iommu_proto::{FaultFlags, FaultReason};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Guest memory, and the device's access to the same pages.
    fn memory() -> (GuestMemoryMmap, RamAccess) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let access = RamAccess::new(Arc::new(mem.clone()));
        (mem, access)
    }

    fn fault(ep: u32) -> FaultRecord {
        FaultRecord {
            reason: FaultReason::Mapping,
            access: FaultFlags::WRITE,
            endpoint: ep,
            address: Some(0x1000),
        }
    }

    #[test]
    fn one_record_per_buffer_in_order() {
        let (mem, device) = memory();
        let mut q = FaultQueue::default();
        assert_eq!(q.fill(&device, [(0x100, 24, true)].into_iter()), None);
        q.push(fault(1));
        q.push(fault(2));
        assert_eq!(q.fill(&device, [(0x100, 64, true)].into_iter()), Some(24));
        let mut b = [0u8; 24];
        mem.read_slice(&mut b, GuestAddress(0x100)).unwrap();
        assert_eq!(FaultRecord::from_bytes(&b), Some(fault(1)));
        // Split across two writable descriptors is still one buffer.
        assert_eq!(
            q.fill(&device, [(0x200, 10, true), (0x300, 14, true)].into_iter()),
            Some(24)
        );
        assert_eq!(q.stats.delivered, 2);
    }

    #[test]
    fn dev_fault_5_small_or_bad_buffers_drop_the_record() {
        let (mem, device) = memory();
        let mut q = FaultQueue::default();
        q.push(fault(1));
        q.push(fault(2));
        q.push(fault(3));
        mem.write_slice(&[0xaa; 16], GuestAddress(0x100)).unwrap();
        assert_eq!(q.fill(&device, [(0x100, 16, true)].into_iter()), Some(0));
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(0x100)).unwrap();
        assert_eq!(b, [0xaa; 16], "nothing written to a short buffer");
        assert_eq!(
            q.fill(&device, [(0x100, 24, false)].into_iter()),
            Some(0),
            "read-only buffer"
        );
        assert_eq!(
            q.fill(&device, [(0xffff_0000, 24, true)].into_iter()),
            Some(0),
            "outside memory"
        );
        assert_eq!(q.stats.dropped_buffer, 3);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn dev_fault_7_a_full_queue_drops_the_oldest() {
        let mut q = FaultQueue::default();
        for ep in 0..(MAX_PENDING_FAULTS as u32 + 10) {
            q.push(fault(ep));
        }
        assert_eq!(q.pending(), MAX_PENDING_FAULTS);
        assert_eq!(q.stats.dropped_full, 10);
        assert_eq!(q.pending.front().map(|f| f.endpoint), Some(10));
    }
}
