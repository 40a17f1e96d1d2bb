//! The configured endpoint set: which IDs exist and what each reserves.

use crate::config::EndpointRange;
use virtio_iommu_proto::probe::ResvMem;

/// Index of an endpoint range in the configuration; endpoints of one range
/// share their reserved regions.
pub type RangeIndex = usize;

/// Sorted, disjoint endpoint ranges with lookup by ID.
#[derive(Clone, Debug)]
pub struct EndpointSet {
    /// Ranges sorted by first ID.
    ranges: Vec<EndpointRange>,
}

impl EndpointSet {
    /// Builds the set from validated (disjoint, non-empty) ranges.
    pub fn new(ranges: &[EndpointRange]) -> Self {
        let mut ranges = ranges.to_vec();
        ranges.sort_unstable_by_key(|r| r.first);
        EndpointSet { ranges }
    }

    /// The range an endpoint belongs to, if it exists.
    pub fn lookup(&self, endpoint: u32) -> Option<RangeIndex> {
        let i = self.ranges.partition_point(|r| r.last < endpoint);
        self.ranges
            .get(i)
            .filter(|r| r.first <= endpoint)
            .map(|_| i)
    }

    /// Whether an endpoint exists.
    pub fn contains(&self, endpoint: u32) -> bool {
        self.lookup(endpoint).is_some()
    }

    /// Reserved regions of the endpoints of a range.
    pub fn resv(&self, range: RangeIndex) -> &[ResvMem] {
        self.ranges.get(range).map_or(&[], |r| &r.resv)
    }

    /// Every endpoint ID, in increasing order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|r| r.first..=r.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_ranges_and_misses_gaps() {
        let set = EndpointSet::new(&[
            EndpointRange {
                first: 10,
                last: 12,
                resv: vec![],
            },
            EndpointRange {
                first: 0,
                last: 3,
                resv: vec![],
            },
            EndpointRange {
                first: u32::MAX,
                last: u32::MAX,
                resv: vec![],
            },
        ]);
        assert_eq!(set.lookup(0), Some(0));
        assert_eq!(set.lookup(3), Some(0));
        assert_eq!(set.lookup(4), None);
        assert_eq!(set.lookup(9), None);
        assert_eq!(set.lookup(10), Some(1));
        assert_eq!(set.lookup(12), Some(1));
        assert_eq!(set.lookup(13), None);
        assert_eq!(set.lookup(u32::MAX), Some(2));
        assert_eq!(set.ids().count(), 8);
        assert!(set.resv(99).is_empty());
    }
}
