//! Host addresses of guest-physical ranges, from the VMM's memory table.

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
