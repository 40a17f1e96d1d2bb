//! Arena nodes: handing them out (fresh, or recycled after a grace
//! period), keeping the domain-root reserve, growing the arena file.

use super::{TableWriter, WriterError, io};
use crate::layout::{self, header};
use crate::memfd;
use crate::sync::Ordering;
use std::os::fd::AsFd;

impl TableWriter {
    /// Nodes that can still be handed out (free now, reclaimable after a
    /// grace period, or never used).
    pub fn available_nodes(&self) -> u64 {
        self.geometry.max_nodes() - self.fresh + self.free.len() as u64 + self.retired.len() as u64
    }

    /// Nodes mappings may still use (the root reserve set aside).
    pub(super) fn available_for_mappings(&self) -> u64 {
        let reserve = self
            .reserved_roots
            .saturating_sub(self.domains.len() as u64);
        self.available_nodes().saturating_sub(reserve)
    }

    /// An upper bound of the nodes that mapping `[first, last]` → `gpa`
    /// can need, computed without touching the table, so that an
    /// impossible MAP fails at once instead of after writing entries.
    ///
    /// Below the root, level `l` needs one node per `entry_span(l + 1)`
    /// stretch the range touches — unless IOVA and GPA agree modulo that
    /// stretch and it may be a leaf, in which case only the unaligned head
    /// and tail need level-`l` nodes.
    pub(super) fn nodes_needed_bound(&self, first: u64, last: u64, gpa: u64) -> u64 {
        (0..self.levels - 1)
            .map(|l| {
                let shift = layout::PAGE_SHIFT + layout::BITS_PER_LEVEL * (l + 1);
                let touched = (last >> shift) - (first >> shift) + 1;
                let huge_above = l < layout::MAX_LEAF_LEVEL
                    && (first ^ gpa) & (layout::entry_span(l + 1) - 1) == 0;
                if huge_above { touched.min(2) } else { touched }
            })
            .sum()
    }

    pub(super) fn alloc_node(&mut self) -> Result<u32, WriterError> {
        if self.available_for_mappings() == 0 {
            return Err(WriterError::ArenaFull(self.geometry.max_nodes()));
        }
        self.alloc_any_node()
    }

    pub(super) fn alloc_any_node(&mut self) -> Result<u32, WriterError> {
        if self.free.is_empty()
            && self.fresh == self.segments * u64::from(self.geometry.segment_nodes)
        {
            // Adds a segment, or (at the maximum size) runs a grace period
            // that makes the retired nodes free, or fails.
            self.grow()?;
        }
        let node = if let Some(n) = self.free.pop() {
            for i in 0..layout::ENTRIES_PER_NODE as usize {
                self.entry(n, i).store(0, Ordering::Relaxed);
            }
            n
        } else if self.fresh < self.segments * u64::from(self.geometry.segment_nodes) {
            self.fresh += 1;
            (self.fresh - 1) as u32
        } else {
            return Err(WriterError::ArenaFull(self.geometry.max_nodes()));
        };
        self.live[node as usize] = 0;
        Ok(node)
    }

    fn grow(&mut self) -> Result<(), WriterError> {
        if self.segments >= u64::from(self.geometry.max_segments) {
            if self.retired.is_empty() {
                return Err(WriterError::ArenaFull(self.geometry.max_nodes()));
            }
            // Nodes wait for a grace period: run it and reuse them.
            self.synchronize();
            return Ok(());
        }
        let bytes = (self.segments + 1) * self.geometry.segment_bytes();
        memfd::resize(self.arena_fd.as_fd(), bytes).map_err(io("grow arena"))?;
        self.segments += 1;
        self.live.resize(
            (self.segments * u64::from(self.geometry.segment_nodes)) as usize,
            0,
        );
        self.table
            .word(header::SEGMENTS)
            .store(self.segments, Ordering::Release);
        tracing::debug!(segments = self.segments, "translation table arena grew");
        Ok(())
    }
}
