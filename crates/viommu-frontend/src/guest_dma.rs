//! The guest's DMA layer for a device behind virtio-iommu, as Linux's
//! `dma-iommu` has it: IOVAs allocated per mapping, and the policy that
//! decides when MAP and UNMAP requests reach the IOMMU.
//!
//! - `off`: no IOMMU; device addresses are guest-physical.
//! - `passthrough`: the endpoint is attached to a bypass (identity) domain;
//!   addresses are guest-physical, nothing is mapped.
//! - `strict`: every buffer is mapped (one MAP, synchronous) before the
//!   device gets it and unmapped (one UNMAP, synchronous) as soon as the
//!   device is done, before the buffer or its IOVA is reused.
//! - `lazy`: mapped the same way; UNMAPs go into a flush queue sent as one
//!   batch every [`FLUSH_ENTRIES`] entries or [`FLUSH_INTERVAL`] (Linux's
//!   default), and an IOVA is reused only once its UNMAP completed.
//!
//! Requests of one step (the MAPs of the buffers posted together, the
//! UNMAPs of the requests completed together) go to the IOMMU as one batch
//! with one kick, as several CPUs mapping at once would.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use virtio_iommu_proto::{Attach, Map, MapFlags, Request, Status, Unmap};

use crate::driver::{Driver, DriverError};

/// Lazy mode: UNMAPs queued before the queue is flushed.
pub const FLUSH_ENTRIES: usize = 256;
/// Lazy mode: longest an UNMAP waits in the flush queue.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
const PAGE: u64 = 4096;

/// When MAPs and UNMAPs reach the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// No IOMMU at all.
    Off,
    /// Bypass (identity) domain.
    Passthrough,
    /// Map before use, unmap right after.
    Strict,
    /// Map before use, unmap in batches.
    Lazy,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Policy::Off),
            "passthrough" => Ok(Policy::Passthrough),
            "strict" => Ok(Policy::Strict),
            "lazy" => Ok(Policy::Lazy),
            _ => Err(format!(
                "policy {s:?}: expected off, passthrough, strict or lazy"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Off => "off",
            Policy::Passthrough => "passthrough",
            Policy::Strict => "strict",
            Policy::Lazy => "lazy",
        })
    }
}

/// A failure of the guest's DMA layer.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Talking to the IOMMU failed.
    #[error(transparent)]
    Iommu(#[from] DriverError),
    /// The IOMMU refused a request.
    #[error("the IOMMU answered {status:?} to {request:?}")]
    Refused {
        /// The request.
        request: Box<Request>,
        /// Its status (`None`: no status).
        status: Option<Status>,
    },
    /// No IOVA space left.
    #[error("out of IOVA space for {0} bytes")]
    NoSpace(u64),
    /// The policy needs an IOMMU connection and none was given.
    #[error("policy {0} needs the IOMMU")]
    NoIommu(Policy),
}

/// Page-granular IOVA allocation in a window, with freed ranges reused by
/// size.
#[derive(Debug)]
pub struct IovaSpace {
    next: u64,
    end: u64,
    free: BTreeMap<u64, Vec<u64>>,
}

impl IovaSpace {
    /// IOVAs in `[base, end)` (page-aligned).
    pub fn new(base: u64, end: u64) -> IovaSpace {
        IovaSpace {
            next: base.div_ceil(PAGE) * PAGE,
            end,
            free: BTreeMap::new(),
        }
    }

    /// `pages` pages of IOVA.
    pub fn alloc(&mut self, pages: u64) -> Option<u64> {
        if let Some(v) = self.free.get_mut(&pages) {
            if let Some(iova) = v.pop() {
                return Some(iova);
            }
        }
        let at = self.next;
        let end = at.checked_add(pages * PAGE)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }

    /// Gives `pages` pages at `iova` back.
    pub fn free(&mut self, iova: u64, pages: u64) {
        self.free.entry(pages).or_default().push(iova);
    }
}

/// Requests counted by the DMA layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// MAP requests sent.
    pub maps: u64,
    /// UNMAP requests sent.
    pub unmaps: u64,
    /// Batches (kicks) of IOMMU requests.
    pub batches: u64,
}

/// One device's DMA mappings.
#[derive(Debug)]
pub struct GuestDma {
    policy: Policy,
    endpoint: u32,
    domain: u32,
    iova: IovaSpace,
    maps: Vec<Request>,
    unmaps: Vec<(u64, u64)>,
    flush_queue: Vec<(u64, u64)>,
    oldest_queued: Option<Instant>,
    stats: DmaStats,
}

impl GuestDma {
    /// The DMA layer of `endpoint`; strict and lazy policies map into
    /// `domain`, at IOVAs of `iova_window`.
    pub fn new(policy: Policy, endpoint: u32, domain: u32, iova_window: (u64, u64)) -> GuestDma {
        GuestDma {
            policy,
            endpoint,
            domain,
            iova: IovaSpace::new(iova_window.0, iova_window.1),
            maps: Vec::new(),
            unmaps: Vec::new(),
            flush_queue: Vec::new(),
            oldest_queued: None,
            stats: DmaStats::default(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Counters.
    pub fn stats(&self) -> DmaStats {
        self.stats
    }

    /// Attaches the endpoint as the policy wants (nothing for `off`).
    pub fn attach(&mut self, iommu: Option<&mut Driver>) -> Result<(), DmaError> {
        let flags = match self.policy {
            Policy::Off => return Ok(()),
            Policy::Passthrough => virtio_iommu_proto::request::VIRTIO_IOMMU_ATTACH_F_BYPASS,
            Policy::Strict | Policy::Lazy => 0,
        };
        let iommu = iommu.ok_or(DmaError::NoIommu(self.policy))?;
        let attach = Request::Attach(Attach {
            domain: self.domain,
            endpoint: self.endpoint,
            flags,
            reserved: [0; 4],
        });
        check(&attach, iommu.send_one(&attach)?.status())
    }

    /// Maps `[gpa, gpa + len)` for the device (`device_writes`: it writes
    /// the buffer) and returns the device address. The MAP is sent by the
    /// next [`Self::sync`].
    pub fn map(&mut self, gpa: u64, len: u64, device_writes: bool) -> Result<u64, DmaError> {
        if matches!(self.policy, Policy::Off | Policy::Passthrough) {
            return Ok(gpa);
        }
        let first = gpa & !(PAGE - 1);
        let pages = (gpa + len).div_ceil(PAGE) - first / PAGE;
        let iova = self
            .iova
            .alloc(pages)
            .ok_or(DmaError::NoSpace(pages * PAGE))?;
        let flags = if device_writes {
            MapFlags::WRITE
        } else {
            MapFlags::READ
        };
        self.maps.push(Request::Map(Map {
            domain: self.domain,
            virt_start: iova,
            virt_end: iova + pages * PAGE - 1,
            phys_start: first,
            flags,
        }));
        Ok(iova + (gpa - first))
    }

    /// Maps guest RAM the device reads and writes for as long as it runs
    /// (rings: `dma_alloc_coherent`); sent at once.
    pub fn map_coherent(
        &mut self,
        iommu: Option<&mut Driver>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, DmaError> {
        if matches!(self.policy, Policy::Off | Policy::Passthrough) {
            return Ok(gpa);
        }
        let iova = self.map(gpa, len, true)?;
        if let Some(Request::Map(m)) = self.maps.last_mut() {
            m.flags = MapFlags::READ.union(MapFlags::WRITE);
        }
        self.sync(iommu.ok_or(DmaError::NoIommu(self.policy))?)?;
        Ok(iova)
    }

    /// Unmaps what [`Self::map`] mapped at device address `addr` for `len`.
    /// Strict: the UNMAP goes with the next [`Self::sync`]; lazy: into the
    /// flush queue.
    pub fn unmap(&mut self, addr: u64, len: u64) {
        if matches!(self.policy, Policy::Off | Policy::Passthrough) {
            return;
        }
        let first = addr & !(PAGE - 1);
        let pages = (addr + len).div_ceil(PAGE) - first / PAGE;
        match self.policy {
            Policy::Strict => self.unmaps.push((first, pages)),
            _ => {
                self.flush_queue.push((first, pages));
                self.oldest_queued.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Whether MAPs or UNMAPs wait to be sent.
    pub fn has_pending(&self) -> bool {
        !self.maps.is_empty() || !self.unmaps.is_empty()
    }

    /// Lazy: whether the flush queue is due.
    pub fn flush_due(&self) -> bool {
        self.flush_queue.len() >= FLUSH_ENTRIES
            || self
                .oldest_queued
                .is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL)
    }

    /// Sends the pending UNMAPs and MAPs (strict), plus the flush queue if
    /// due (lazy) or if `flush_all`, as one batch; IOVAs of completed
    /// UNMAPs become free.
    pub fn sync_with(&mut self, iommu: &mut Driver, flush_all: bool) -> Result<(), DmaError> {
        let mut freed = std::mem::take(&mut self.unmaps);
        if !self.flush_queue.is_empty() && (flush_all || self.flush_due()) {
            freed.append(&mut self.flush_queue);
            self.oldest_queued = None;
        }
        if freed.is_empty() && self.maps.is_empty() {
            return Ok(());
        }
        let mut reqs: Vec<Request> = freed
            .iter()
            .map(|&(iova, pages)| {
                Request::Unmap(Unmap {
                    domain: self.domain,
                    virt_start: iova,
                    virt_end: iova + pages * PAGE - 1,
                    reserved: [0; 4],
                })
            })
            .collect();
        self.stats.unmaps += reqs.len() as u64;
        self.stats.maps += self.maps.len() as u64;
        reqs.append(&mut self.maps);
        self.stats.batches += 1;
        let outcomes = iommu.send(&reqs)?;
        for (req, out) in reqs.iter().zip(&outcomes) {
            check(req, out.status())?;
        }
        for (iova, pages) in freed {
            self.iova.free(iova, pages);
        }
        Ok(())
    }

    /// [`Self::sync_with`] without forcing the flush queue.
    pub fn sync(&mut self, iommu: &mut Driver) -> Result<(), DmaError> {
        self.sync_with(iommu, false)
    }
}

fn check(req: &Request, status: Option<Status>) -> Result<(), DmaError> {
    if status == Some(Status::Ok) {
        Ok(())
    } else {
        Err(DmaError::Refused {
            request: Box::new(*req),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovas_are_page_granular_and_reused_by_size() {
        let mut s = IovaSpace::new(0x1000, 0x5000);
        let a = s.alloc(1).unwrap();
        let b = s.alloc(2).unwrap();
        assert_eq!((a, b), (0x1000, 0x2000));
        assert_eq!(s.alloc(2), None, "window exhausted");
        s.free(b, 2);
        assert_eq!(s.alloc(2), Some(b));
        assert_eq!(s.alloc(1), Some(0x4000));
    }

    #[test]
    fn strict_and_lazy_map_to_iovas_off_and_passthrough_do_not() {
        for p in [Policy::Off, Policy::Passthrough] {
            let mut d = GuestDma::new(p, 8, 1, (0x10_0000, 0x20_0000));
            assert_eq!(d.map(0x1234, 16, false).unwrap(), 0x1234);
            d.unmap(0x1234, 16);
            assert!(!d.has_pending());
        }
        let mut d = GuestDma::new(Policy::Strict, 8, 1, (0x10_0000, 0x20_0000));
        let iova = d.map(0x1ffe, 4, true).unwrap();
        assert_eq!(iova & 0xfff, 0xffe, "offset kept");
        match d.maps[0] {
            Request::Map(m) => {
                assert_eq!(
                    (m.phys_start, m.virt_end - m.virt_start + 1),
                    (0x1000, 0x2000)
                );
                assert_eq!(m.flags, MapFlags::WRITE);
            }
            _ => panic!(),
        }
        d.unmap(iova, 4);
        assert_eq!(d.unmaps, vec![(0x10_0000, 2)]);
        let mut l = GuestDma::new(Policy::Lazy, 8, 1, (0x10_0000, 0x20_0000));
        let iova = l.map(0x3000, 4096, false).unwrap();
        l.unmap(iova, 4096);
        assert!(l.unmaps.is_empty() && l.flush_queue.len() == 1);
        assert!(!l.flush_due());
    }
}
