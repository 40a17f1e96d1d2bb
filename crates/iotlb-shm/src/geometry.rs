//! The shape of a table: which endpoints have words, how deep the radix
//! trees are, how the node arena grows. Written once in the header by the
//! writer, validated by every reader.

use thiserror::Error;

use crate::layout::{self, NODE_BYTES};

/// Shape of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Lowest endpoint ID with a word.
    pub endpoint_base: u32,
    /// Number of endpoint words (IDs `endpoint_base ..`).
    pub endpoint_count: u32,
    /// IOVAs below `1 << input_bits` can be mapped (64 = all).
    pub input_bits: u32,
    /// Nodes added per arena growth step.
    pub segment_nodes: u32,
    /// Most segments the arena may hold.
    pub max_segments: u32,
}

/// A geometry that cannot be laid out.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    /// `input_bits` outside 12..=64.
    #[error("input range of {0} bits is not in 12..=64")]
    InputBits(u32),
    /// No endpoints, or IDs past `u32::MAX`.
    #[error("endpoint range base {base:#x} count {count} is empty or past u32::MAX")]
    Endpoints {
        /// First ID.
        base: u32,
        /// Count.
        count: u32,
    },
    /// Zero-sized segments or no segments, or more than 2^32 nodes.
    #[error("arena of {segments} segments × {nodes} nodes is empty or exceeds 2^32 nodes")]
    Arena {
        /// Nodes per segment.
        nodes: u32,
        /// Segments.
        segments: u32,
    },
}

impl Default for Geometry {
    /// Endpoints 0–0xffff, 48-bit IOVAs, 2 MiB segments, up to 8 GiB of
    /// nodes (address space reserved in each reader, not memory).
    fn default() -> Self {
        Self {
            endpoint_base: 0,
            endpoint_count: 0x1_0000,
            input_bits: 48,
            segment_nodes: 512,
            max_segments: 4096,
        }
    }
}

impl Geometry {
    /// Checks that the geometry can be laid out.
    pub fn validate(&self) -> Result<(), GeometryError> {
        if !(layout::PAGE_SHIFT..=64).contains(&self.input_bits) {
            return Err(GeometryError::InputBits(self.input_bits));
        }
        let last = u64::from(self.endpoint_base) + u64::from(self.endpoint_count);
        if self.endpoint_count == 0 || last > 1 << 32 {
            return Err(GeometryError::Endpoints {
                base: self.endpoint_base,
                count: self.endpoint_count,
            });
        }
        if self.segment_nodes == 0 || self.max_segments == 0 || self.max_nodes() > 1 << 32 {
            return Err(GeometryError::Arena {
                nodes: self.segment_nodes,
                segments: self.max_segments,
            });
        }
        Ok(())
    }

    /// Radix levels per domain.
    pub fn levels(&self) -> u32 {
        layout::levels_for(self.input_bits)
    }

    /// Most nodes the arena can hold.
    pub fn max_nodes(&self) -> u64 {
        u64::from(self.segment_nodes) * u64::from(self.max_segments)
    }

    /// Bytes of address space the arena mapping reserves.
    pub fn arena_bytes(&self) -> u64 {
        self.max_nodes() * NODE_BYTES
    }

    /// Bytes of one segment.
    pub fn segment_bytes(&self) -> u64 {
        u64::from(self.segment_nodes) * NODE_BYTES
    }

    /// Size of the table file.
    pub fn table_bytes(&self) -> u64 {
        layout::table_file_bytes(u64::from(self.endpoint_count))
    }

    /// Index of `endpoint`'s word, if it has one.
    #[inline]
    pub fn endpoint_index(&self, endpoint: u32) -> Option<u64> {
        let i = endpoint.checked_sub(self.endpoint_base)?;
        (i < self.endpoint_count).then_some(u64::from(i))
    }

    /// Whether `iova` is inside the input range.
    #[inline]
    pub fn in_input_range(&self, iova: u64) -> bool {
        self.input_bits >= 64 || iova >> self.input_bits == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_and_bad_shapes_are_named() {
        let g = Geometry::default();
        assert_eq!(g.validate(), Ok(()));
        assert_eq!(g.levels(), 4);
        assert_eq!(g.endpoint_index(0xffff), Some(0xffff));
        assert_eq!(g.endpoint_index(0x1_0000), None);
        assert!(g.in_input_range((1 << 48) - 1) && !g.in_input_range(1 << 48));
        let bad = Geometry {
            input_bits: 11,
            ..g
        };
        assert_eq!(bad.validate(), Err(GeometryError::InputBits(11)));
        let bad = Geometry {
            endpoint_base: u32::MAX,
            endpoint_count: 2,
            ..g
        };
        assert!(matches!(
            bad.validate(),
            Err(GeometryError::Endpoints { .. })
        ));
        let bad = Geometry {
            segment_nodes: 0,
            ..g
        };
        assert!(matches!(bad.validate(), Err(GeometryError::Arena { .. })));
        let all = Geometry {
            input_bits: 64,
            endpoint_base: 0,
            endpoint_count: u32::MAX,
            ..g
        };
        assert_eq!(all.validate(), Ok(()));
        assert!(all.in_input_range(u64::MAX));
    }
}
