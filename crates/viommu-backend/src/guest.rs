//! Host addresses of guest-physical ranges, from the VMM's memory table.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::error::DmaError;

/// Guest RAM as the VMM's memory table describes it.
pub type GuestRam = GuestMemoryMmap<()>;

/// Calls `piece(host, len)` for the host pieces of `[gpa, gpa + len)`,
/// split where guest RAM regions end. Fails, before calling `piece`, if any
/// byte lies outside guest RAM.
pub fn for_each_host_piece(
    ram: &GuestRam,
    gpa: u64,
    len: u64,
    mut piece: impl FnMut(*mut u8, u64),
) -> Result<(), DmaError> {
    let outside = DmaError::OutsideRam { gpa, len };
    gpa.checked_add(len).ok_or(outside.clone())?;
    // Check the whole range first: nothing is touched unless all of it is
    // guest RAM.
    let mut at = gpa;
    let end = gpa + len;
    while at < end {
        let region = ram.find_region(GuestAddress(at)).ok_or(outside.clone())?;
        let region_end = region.start_addr().0 + region.len();
        at = region_end.min(end);
    }
    let mut at = gpa;
    while at < end {
        let region = ram.find_region(GuestAddress(at)).ok_or(outside.clone())?;
        let offset = at - region.start_addr().0;
        let take = (region.len() - offset).min(end - at);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| outside.clone())?;
        piece(host, take);
        at += take;
    }
    Ok(())
}

/// The host address of `[gpa, gpa + len)`, which must lie in one region.
pub fn host_range(ram: &GuestRam, gpa: u64, len: u64) -> Result<*mut u8, DmaError> {
    let outside = DmaError::OutsideRam { gpa, len };
    let region = ram.find_region(GuestAddress(gpa)).ok_or(outside.clone())?;
    let offset = gpa - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|e| e > region.len()) {
        return Err(DmaError::NotContiguous { addr: gpa, len });
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside)
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
        for_each_host_piece(&m, 0x3000, 0x2000, |_, l| pieces.push(l)).unwrap();
        assert_eq!(pieces, vec![0x1000, 0x1000]);
        let mut called = false;
        assert!(matches!(
            for_each_host_piece(&m, 0x5000, 0x2000, |_, _| called = true),
            Err(DmaError::OutsideRam { .. })
        ));
        assert!(
            !called,
            "nothing is touched when part of the range is outside"
        );
        assert!(for_each_host_piece(&m, u64::MAX, 2, |_, _| ()).is_err());
        assert!(host_range(&m, 0x1000, 0x1000).is_ok());
        assert!(matches!(
            host_range(&m, 0x3000, 0x2000),
            Err(DmaError::NotContiguous { .. })
        ));
        assert!(host_range(&m, 0x9000, 1).is_err());
    }
}
