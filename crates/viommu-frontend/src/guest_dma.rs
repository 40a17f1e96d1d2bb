//! The guest's DMA layer for a device behind virtio-iommu, as Linux's
//! `dma-iommu` has it: IOVAs allocated per mapping, and the policy that
//! decides when MAP and UNMAP requests reach the IOMMU.
//!
//! - `off`: no IOMMU; device addresses are guest-physical.
//! - `passthrough`: the endpoint is attached to a bypass (identity) domain;
//!   addresses are guest-physical, nothing is mapped.
//! - `strict`: every buffer is mapped before the device gets it and
//!   unmapped as soon as the device is done; each MAP and each UNMAP is
//!   synchronous (Linux's `iommu_map` + `iotlb_sync_map`, `iommu_unmap` +
//!   `iotlb_sync`: one request, one kick, waited for).
//! - `lazy`: each MAP as in strict; an UNMAP is queued on the request queue
//!   without a kick (virtio-iommu's `unmap_pages` adds it, only a sync
//!   kicks) and so goes out with the next MAP's sync, or at the latest when
//!   the flush queue is flushed ([`FLUSH_ENTRIES`] entries or
//!   [`FLUSH_INTERVAL`], Linux's defaults); an IOVA is reused only after
//!   that flush.
//!
//! - `static`: what a driver in guest userspace does (DPDK or SPDK through
//!   VFIO): all of guest RAM is mapped once, at attach, at IOVA = window
//!   base + guest-physical address; no request per I/O. The device still
//!   translates every address through the IOMMU.
//!
//! A guest's `dma_map_sg` maps each scatter-gather entry on its own: a
//! virtio-blk request (header, data, status) costs three MAPs.

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
    /// All of guest RAM mapped once at attach.
    Static,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Policy::Off),
            "passthrough" => Ok(Policy::Passthrough),
            "strict" => Ok(Policy::Strict),
            "lazy" => Ok(Policy::Lazy),
            "static" => Ok(Policy::Static),
            _ => Err(format!(
                "policy {s:?}: expected off, passthrough, strict, lazy or static"
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
            Policy::Static => "static",
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
    /// Lazy: UNMAPs queued, not kicked yet.
    queued: Vec<Request>,
    /// Lazy: IOVAs waiting for the flush to be reused.
    flush_queue: Vec<(u64, u64)>,
    oldest_queued: Option<Instant>,
    /// Static: the IOVA of guest-physical address 0.
    static_base: u64,
    stats: DmaStats,
}

impl GuestDma {
    /// The DMA layer of `endpoint`; strict and lazy policies map into
    /// `domain`, at IOVAs of `iova_window`; static maps guest RAM at IOVAs
    /// from the window's base on.
    pub fn new(policy: Policy, endpoint: u32, domain: u32, iova_window: (u64, u64)) -> GuestDma {
        GuestDma {
            policy,
            endpoint,
            domain,
            iova: IovaSpace::new(iova_window.0, iova_window.1),
            queued: Vec::new(),
            flush_queue: Vec::new(),
            oldest_queued: None,
            static_base: iova_window.0,
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

    /// Attaches the endpoint as the policy wants (nothing for `off`);
    /// `static` then maps all of guest RAM.
    pub fn attach(&mut self, iommu: Option<&mut Driver>) -> Result<(), DmaError> {
        let flags = match self.policy {
            Policy::Off => return Ok(()),
            Policy::Passthrough => virtio_iommu_proto::request::VIRTIO_IOMMU_ATTACH_F_BYPASS,
            Policy::Strict | Policy::Lazy | Policy::Static => 0,
        };
        let iommu = iommu.ok_or(DmaError::NoIommu(self.policy))?;
        let attach = Request::Attach(Attach {
            domain: self.domain,
            endpoint: self.endpoint,
            flags,
            reserved: [0; 4],
        });
        check(&attach, iommu.send_one(&attach)?.status())?;
        if self.policy == Policy::Static {
            let ram = iommu.ram().size();
            let map = Request::Map(Map {
                domain: self.domain,
                virt_start: self.static_base,
                virt_end: self.static_base + ram - 1,
                phys_start: 0,
                flags: MapFlags::READ.union(MapFlags::WRITE),
            });
            self.stats.maps += 1;
            self.sync_one(iommu, Some(map))?;
        }
        Ok(())
    }

    fn translated(&self) -> bool {
        matches!(self.policy, Policy::Strict | Policy::Lazy)
    }

    /// Sends `req` (with the UNMAPs queued before it, lazy) and waits: one
    /// sync.
    fn sync_one(&mut self, iommu: &mut Driver, req: Option<Request>) -> Result<(), DmaError> {
        let mut reqs = std::mem::take(&mut self.queued);
        reqs.extend(req);
        if reqs.is_empty() {
            return Ok(());
        }
        self.stats.batches += 1;
        let outcomes = iommu.send(&reqs)?;
        for (r, o) in reqs.iter().zip(&outcomes) {
            check(r, o.status())?;
        }
        Ok(())
    }

    /// `dma_map`: maps `[gpa, gpa + len)` for the device (`device_writes`:
    /// it writes the buffer) and returns the device address. Strict and
    /// lazy: one MAP, synchronous.
    pub fn map(
        &mut self,
        iommu: Option<&mut Driver>,
        gpa: u64,
        len: u64,
        device_writes: bool,
    ) -> Result<u64, DmaError> {
        self.map_with(
            iommu,
            gpa,
            len,
            if device_writes {
                MapFlags::WRITE
            } else {
                MapFlags::READ
            },
        )
    }

    fn map_with(
        &mut self,
        iommu: Option<&mut Driver>,
        gpa: u64,
        len: u64,
        flags: MapFlags,
    ) -> Result<u64, DmaError> {
        if self.policy == Policy::Static {
            return Ok(self.static_base + gpa);
        }
        if !self.translated() {
            return Ok(gpa);
        }
        let iommu = iommu.ok_or(DmaError::NoIommu(self.policy))?;
        let first = gpa & !(PAGE - 1);
        let pages = (gpa + len).div_ceil(PAGE) - first / PAGE;
        let iova = self
            .iova
            .alloc(pages)
            .ok_or(DmaError::NoSpace(pages * PAGE))?;
        let map = Request::Map(Map {
            domain: self.domain,
            virt_start: iova,
            virt_end: iova + pages * PAGE - 1,
            phys_start: first,
            flags,
        });
        self.stats.maps += 1;
        if let Err(e) = self.sync_one(iommu, Some(map)) {
            self.iova.free(iova, pages);
            return Err(e);
        }
        Ok(iova + (gpa - first))
    }

    /// Maps guest RAM the device reads and writes for as long as it runs
    /// (rings: `dma_alloc_coherent`).
    pub fn map_coherent(
        &mut self,
        iommu: Option<&mut Driver>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, DmaError> {
        self.map_with(iommu, gpa, len, MapFlags::READ.union(MapFlags::WRITE))
    }

    /// `dma_unmap` of what [`Self::map`] mapped at device address `addr`
    /// for `len`. Strict: one UNMAP, synchronous. Lazy: the UNMAP is queued
    /// (it goes with the next sync) and the IOVA waits for the flush.
    pub fn unmap(
        &mut self,
        iommu: Option<&mut Driver>,
        addr: u64,
        len: u64,
    ) -> Result<(), DmaError> {
        if !self.translated() {
            return Ok(());
        }
        let first = addr & !(PAGE - 1);
        let pages = (addr + len).div_ceil(PAGE) - first / PAGE;
        let unmap = Request::Unmap(Unmap {
            domain: self.domain,
            virt_start: first,
            virt_end: first + pages * PAGE - 1,
            reserved: [0; 4],
        });
        self.stats.unmaps += 1;
        match self.policy {
            Policy::Strict => {
                let iommu = iommu.ok_or(DmaError::NoIommu(self.policy))?;
                self.sync_one(iommu, Some(unmap))?;
                self.iova.free(first, pages);
            }
            _ => {
                self.queued.push(unmap);
                self.flush_queue.push((first, pages));
                self.oldest_queued.get_or_insert_with(Instant::now);
            }
        }
        Ok(())
    }

    /// Lazy: whether the flush queue is due.
    pub fn flush_due(&self) -> bool {
        self.flush_queue.len() >= FLUSH_ENTRIES
            || self
                .oldest_queued
                .is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL)
    }

    /// Lazy: flushes the queue if due (or always with `all`): a sync for
    /// the UNMAPs still queued, then their IOVAs become free.
    pub fn flush(&mut self, iommu: Option<&mut Driver>, all: bool) -> Result<(), DmaError> {
        if self.flush_queue.is_empty() || !(all || self.flush_due()) {
            return Ok(());
        }
        let iommu = iommu.ok_or(DmaError::NoIommu(self.policy))?;
        self.sync_one(iommu, None)?;
        for (iova, pages) in std::mem::take(&mut self.flush_queue) {
            self.iova.free(iova, pages);
        }
        self.oldest_queued = None;
        Ok(())
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
    fn off_and_passthrough_need_no_iommu_and_map_nothing() {
        for p in [Policy::Off, Policy::Passthrough] {
            let mut d = GuestDma::new(p, 8, 1, (0x10_0000, 0x20_0000));
            assert_eq!(d.map(None, 0x1234, 16, false).unwrap(), 0x1234);
            d.unmap(None, 0x1234, 16).unwrap();
            d.flush(None, true).unwrap();
            assert_eq!(d.stats(), DmaStats::default());
        }
        let mut d = GuestDma::new(Policy::Strict, 8, 1, (0x10_0000, 0x20_0000));
        assert!(matches!(
            d.map(None, 0x1000, 16, false),
            Err(DmaError::NoIommu(_))
        ));
        assert_eq!(
            d.stats().maps,
            0,
            "nothing counted for a map that was not sent"
        );
    }

    #[test]
    fn static_addresses_are_guest_ram_shifted_and_cost_no_request() {
        let mut d = GuestDma::new(Policy::Static, 8, 1, (0x10_0000, 0x20_0000));
        assert_eq!(d.map(None, 0x1234, 16, true).unwrap(), 0x10_1234);
        assert_eq!(d.map_coherent(None, 0, 4096).unwrap(), 0x10_0000);
        d.unmap(None, 0x10_1234, 16).unwrap();
        d.flush(None, true).unwrap();
        assert_eq!(d.stats(), DmaStats::default());
        assert!(matches!(d.attach(None), Err(DmaError::NoIommu(_))));
        assert_eq!("static".parse::<Policy>(), Ok(Policy::Static));
        assert_eq!(Policy::Static.to_string(), "static");
    }

    #[test]
    fn lazy_unmaps_wait_in_the_queue_and_their_iovas_for_the_flush() {
        let mut l = GuestDma::new(Policy::Lazy, 8, 1, (0x10_0000, 0x20_0000));
        l.unmap(None, 0x10_0ffe, 4).unwrap();
        assert_eq!(l.queued.len(), 1);
        assert_eq!(l.flush_queue, vec![(0x10_0000, 2)], "page-granular");
        assert!(!l.flush_due());
    }
}
