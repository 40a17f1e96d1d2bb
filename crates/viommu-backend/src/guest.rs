//! Host addresses of guest-physical ranges, from the VMM's memory table.

use std::sync::Arc;

use iotlb_shm::Access;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::error::DmaError;

/// Guest RAM as the VMM's memory table describes it.
pub type GuestRam = GuestMemoryMmap<()>;

/// Appends the host pieces of `[gpa, gpa + len)` to `out` as
/// `(host address, length)`, split where guest RAM regions end. Fails if any
/// byte lies outside guest RAM; what was appended is then meaningless and
/// the caller discards it.
pub fn push_host_pieces(
    ram: &GuestRam,
    gpa: u64,
    len: u64,
    out: &mut Vec<(usize, u64)>,
) -> Result<(), DmaError> {
    let outside = || DmaError::OutsideRam { gpa, len };
    let end = gpa.checked_add(len).ok_or_else(outside)?;
    let mut at = gpa;
    while at < end {
        let region = ram.find_region(GuestAddress(at)).ok_or_else(outside)?;
        let offset = at - region.start_addr().0;
        let take = (region.len() - offset).min(end - at);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| outside())?;
        out.push((host as usize, take));
        at += take;
    }
    Ok(())
}

/// Guest RAM reached without translation, for a device in front of no
/// IOMMU (the IOMMU itself): host addresses of guest-physical ranges,
/// each checked against the memory table once. Keeps the mapping alive.
#[derive(Debug, Clone)]
pub struct RamAccess {
    ram: Arc<GuestRam>,
    /// `(guest-physical start, length, host address)` per region, sorted.
    regions: Vec<(u64, u64, usize)>,
}

impl RamAccess {
    /// Access to `ram`.
    pub fn new(ram: Arc<GuestRam>) -> RamAccess {
        let regions = ram
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((r.start_addr().0, r.len(), host as usize))
            })
            .collect();
        RamAccess { ram, regions }
    }

    /// The memory table this reads.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The host address of `[gpa, gpa + len)`, which must lie inside one
    /// region (an empty range at a region's end included).
    #[inline]
    pub fn host(&self, gpa: u64, len: u64) -> Result<*mut u8, DmaError> {
        for &(start, size, host) in &self.regions {
            let Some(offset) = gpa.checked_sub(start) else {
                continue;
            };
            if offset < size || (len == 0 && offset == size) {
                if len > size - offset {
                    return Err(DmaError::NotContiguous { addr: gpa, len });
                }
                return Ok((host + offset as usize) as *mut u8);
            }
        }
        Err(DmaError::OutsideRam { gpa, len })
    }

    /// Copies guest memory at `gpa` into `buf` (volatile loads: the guest
    /// may write it concurrently).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let src = self.host(gpa, buf.len() as u64)?;
        // SAFETY: `src..src + buf.len()` lies inside one mapped region
        // (checked by `host`), kept mapped by `self.ram`.
        unsafe { copy_from_guest(src, buf) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (volatile stores).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let dst = self.host(gpa, data.len() as u64)?;
        // SAFETY: `dst..dst + data.len()` lies inside one mapped region
        // (checked by `host`), kept mapped by `self.ram`.
        unsafe { copy_to_guest(data, dst) };
        Ok(())
    }
}

/// Copies `buf.len()` bytes of guest memory at `src` into `buf`, eight
/// bytes per volatile load where it can (the guest may write them
/// concurrently; no byte is read twice).
///
/// # Safety
///
/// `src..src + buf.len()` must be mapped and readable for the whole call.
#[inline]
pub unsafe fn copy_from_guest(src: *const u8, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    let mut at = src;
    for chunk in &mut chunks {
        // SAFETY: the caller maps `src..src + buf.len()`; this chunk is 8
        // bytes inside it; `[u8; 8]` needs no alignment.
        let v = unsafe { std::ptr::read_volatile(at.cast::<[u8; 8]>()) };
        chunk.copy_from_slice(&v);
        // SAFETY: stays within (or one past) the mapped range.
        at = unsafe { at.add(8) };
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        // SAFETY: the remainder's bytes follow the chunks inside the range.
        *b = unsafe { std::ptr::read_volatile(at.add(i)) };
    }
}

/// Copies `data` into guest memory at `dst`, eight bytes per volatile
/// store where it can.
///
/// # Safety
///
/// `dst..dst + data.len()` must be mapped and writable for the whole call.
#[inline]
pub unsafe fn copy_to_guest(data: &[u8], dst: *mut u8) {
    let mut chunks = data.chunks_exact(8);
    let mut at = dst;
    for chunk in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(chunk);
        // SAFETY: the caller maps `dst..dst + data.len()` writable; this
        // chunk is 8 bytes inside it; `[u8; 8]` needs no alignment.
        unsafe { std::ptr::write_volatile(at.cast::<[u8; 8]>(), v) };
        // SAFETY: stays within (or one past) the mapped range.
        at = unsafe { at.add(8) };
    }
    for (i, &b) in chunks.remainder().iter().enumerate() {
        // SAFETY: the remainder's bytes follow the chunks inside the range.
        unsafe { std::ptr::write_volatile(at.add(i), b) };
    }
}

impl crate::ring::RingMemory for RamAccess {
    fn host_range(&self, addr: u64, len: u64, _access: Access) -> Result<*mut u8, DmaError> {
        self.host(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x2000)])
            .unwrap()
    }

    #[test]
    fn ranges_split_at_region_ends_and_stay_inside_ram() {
        let m = ram();
        let mut pieces = Vec::new();
        push_host_pieces(&m, 0x3000, 0x2000, &mut pieces).unwrap();
        let lens: Vec<u64> = pieces.iter().map(|p| p.1).collect();
        assert_eq!(lens, vec![0x1000, 0x1000]);
        let base = m.get_host_address(GuestAddress(0x3000)).unwrap() as usize;
        assert_eq!(pieces[0].0, base);
        assert!(matches!(
            push_host_pieces(&m, 0x5000, 0x2000, &mut Vec::new()),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(matches!(
            push_host_pieces(&m, 0x9000, 1, &mut Vec::new()),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(push_host_pieces(&m, u64::MAX, 2, &mut Vec::new()).is_err());
        let mut empty = Vec::new();
        push_host_pieces(&m, 0x1000, 0, &mut empty).unwrap();
        assert!(empty.is_empty());
    }
}

#[cfg(test)]
mod ram_access_tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_resolve_inside_one_region_only() {
        let m = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x2000),
                (GuestAddress(0x8000), 0x1000),
            ])
            .unwrap(),
        );
        let a = RamAccess::new(Arc::clone(&m));
        a.write(0x2ffe, &[1, 2]).unwrap();
        let mut two = [0u8; 2];
        a.read(0x2ffe, &mut two).unwrap();
        assert_eq!(two, [1, 2]);
        assert_eq!(
            a.host(0x8000, 0x10).unwrap() as usize,
            m.get_host_address(GuestAddress(0x8000)).unwrap() as usize
        );
        // Crossing a region's end, between regions, past the last one.
        assert!(matches!(
            a.read(0x2fff, &mut two),
            Err(DmaError::NotContiguous { .. })
        ));
        assert!(matches!(
            a.host(0x4000, 1),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(a.host(0x9000, 1).is_err());
        assert!(a.host(u64::MAX, 2).is_err());
        assert!(a.host(0x0fff, 1).is_err());
        assert!(a.host(0x3000, 0).is_ok());
        // Every length up to a few chunks, at odd offsets, round trips.
        for len in 0..27usize {
            let data: Vec<u8> = (0..len as u8).map(|b| b ^ 0x5a).collect();
            a.write(0x1003, &data).unwrap();
            let mut back = vec![0u8; len];
            a.read(0x1003, &mut back).unwrap();
            assert_eq!(back, data, "length {len}");
            let mut plain = vec![0u8; len];
            m.read_slice(&mut plain, GuestAddress(0x1003)).unwrap();
            assert_eq!(plain, data, "length {len}, through vm-memory");
        }
    }
}
