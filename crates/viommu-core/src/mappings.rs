//! The authoritative mapping set of one translated domain: inclusive IOVA
//! ranges created by MAP, never merged, never overlapping.

use std::collections::BTreeMap;
use virtio_iommu_proto::MapFlags;

/// One mapping, exactly as one MAP request created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA, inclusive.
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// Access flags.
    pub flags: MapFlags,
}

impl Mapping {
    /// Guest-physical address of `iova`, which must lie inside the mapping.
    pub const fn phys_of(&self, iova: u64) -> u64 {
        self.phys_start
            .wrapping_add(iova.wrapping_sub(self.virt_start))
    }
}

/// Value stored per mapping; the key is `virt_start`.
#[derive(Clone, Copy, Debug)]
struct Entry {
    virt_end: u64,
    phys_start: u64,
    flags: MapFlags,
}

impl Entry {
    const fn mapping(&self, virt_start: u64) -> Mapping {
        Mapping {
            virt_start,
            virt_end: self.virt_end,
            phys_start: self.phys_start,
            flags: self.flags,
        }
    }
}

/// Why an UNMAP cannot proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WouldSplit;

/// Mappings of one domain, keyed by first IOVA.
#[derive(Clone, Debug, Default)]
pub struct MappingTable {
    map: BTreeMap<u64, Entry>,
}

impl MappingTable {
    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether any mapping shares an address with `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // The mapping with the greatest start ≤ end is the only candidate:
        // mappings are disjoint, so any earlier one ends before it starts.
        self.map
            .range(..=end)
            .next_back()
            .is_some_and(|(_, e)| e.virt_end >= start)
    }

    /// Adds a mapping; the caller has checked that it overlaps nothing.
    pub fn insert(&mut self, m: Mapping) {
        self.map.insert(
            m.virt_start,
            Entry {
                virt_end: m.virt_end,
                phys_start: m.phys_start,
                flags: m.flags,
            },
        );
    }

    /// Removes every mapping inside `[start, end]`, calling `removed` for
    /// each, or removes nothing if a mapping straddles either bound.
    pub fn unmap(
        &mut self,
        start: u64,
        end: u64,
        mut removed: impl FnMut(Mapping),
    ) -> Result<(), WouldSplit> {
        // One descent finds the last mapping starting at or before `end`
        // and, stepping back in the same leaf, the one before it.
        let mut rev = self.map.range(..=end);
        let Some((&last_key, last)) = rev.next_back() else {
            return Ok(());
        };
        if last.virt_end < start {
            return Ok(()); // Every mapping at or before `end` ends before `start`.
        }
        if last.virt_end > end || last_key < start {
            return Err(WouldSplit);
        }
        match rev.next_back() {
            // Common case: exactly one mapping is covered.
            None => {}
            Some((_, prev)) if prev.virt_end < start => {}
            Some(_) => return self.unmap_several(start, last_key, removed),
        }
        if let Some(e) = self.map.remove(&last_key) {
            removed(e.mapping(last_key));
        }
        Ok(())
    }

    /// UNMAP over several mappings, the last of which starts at `last_key`
    /// and ends inside the range: check the first, then remove them all.
    fn unmap_several(
        &mut self,
        start: u64,
        last_key: u64,
        mut removed: impl FnMut(Mapping),
    ) -> Result<(), WouldSplit> {
        if self
            .map
            .range(..start)
            .next_back()
            .is_some_and(|(_, e)| e.virt_end >= start)
        {
            return Err(WouldSplit);
        }
        while let Some((&key, _)) = self.map.range(start..=last_key).next() {
            if let Some(e) = self.map.remove(&key) {
                removed(e.mapping(key));
            }
        }
        Ok(())
    }

    /// The mapping that contains `iova`.
    pub fn find(&self, iova: u64) -> Option<Mapping> {
        self.map
            .range(..=iova)
            .next_back()
            .filter(|(_, e)| e.virt_end >= iova)
            .map(|(&k, e)| e.mapping(k))
    }

    /// Every mapping in increasing IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.map.iter().map(|(&k, e)| e.mapping(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: u64, e: u64) -> Mapping {
        Mapping {
            virt_start: s,
            virt_end: e,
            phys_start: s + 0x1000,
            flags: MapFlags::READ,
        }
    }

    #[test]
    fn overlap_checks_both_neighbours() {
        let mut t = MappingTable::default();
        t.insert(m(10, 19));
        assert!(t.overlaps(19, 30));
        assert!(t.overlaps(0, 10));
        assert!(t.overlaps(12, 13));
        assert!(t.overlaps(0, u64::MAX));
        assert!(!t.overlaps(20, 30));
        assert!(!t.overlaps(0, 9));
    }

    #[test]
    fn unmap_is_all_or_nothing() {
        let mut t = MappingTable::default();
        t.insert(m(0, 4));
        t.insert(m(10, 19));
        let mut gone = vec![];
        assert_eq!(t.unmap(0, 14, |x| gone.push(x)), Err(WouldSplit));
        assert_eq!(t.len(), 2);
        assert_eq!(t.unmap(5, 10, |x| gone.push(x)), Err(WouldSplit));
        assert_eq!(t.unmap(0, 19, |x| gone.push(x)), Ok(()));
        assert_eq!(gone, vec![m(0, 4), m(10, 19)]);
        assert!(t.is_empty());
    }

    #[test]
    fn find_and_phys_of() {
        let mut t = MappingTable::default();
        t.insert(m(0x10, 0x1f));
        let found = t.find(0x1f).unwrap();
        assert_eq!(found.phys_of(0x1f), 0x101f);
        assert!(t.find(0x20).is_none());
        assert!(t.find(0xf).is_none());
    }
}
