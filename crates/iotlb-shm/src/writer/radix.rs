//! The per-domain radix trees and the endpoint words: publishing mappings
//! (visible on return), clearing them and detaching emptied nodes (reused
//! only after a grace period), pointing endpoints at their targets.

use super::{EndpointTarget, GraceReport, Perms, TableWriter, WriterError};
use crate::layout::{self, endpoint as ep_word, pte};
use crate::sync::Ordering;

impl TableWriter {
    /// Creates an empty domain.
    pub fn create_domain(&mut self, domain: u32) -> Result<(), WriterError> {
        if self.domains.contains_key(&domain) {
            return Err(WriterError::DomainExists(domain));
        }
        let root = self.alloc_any_node()?;
        self.domains.insert(domain, root);
        Ok(())
    }

    /// Points an endpoint at its new target. Leaving a domain or bypass
    /// needs a grace period; leaving the blocked state does not.
    pub fn set_endpoint(
        &mut self,
        endpoint: u32,
        target: EndpointTarget,
    ) -> Result<(), WriterError> {
        let word = self.endpoint_word(endpoint)?;
        let (kind, root) = match target {
            EndpointTarget::Blocked => (ep_word::KIND_BLOCKED, 0),
            EndpointTarget::Bypass => (ep_word::KIND_BYPASS, 0),
            EndpointTarget::Domain(d) => (
                ep_word::KIND_DOMAIN,
                *self.domains.get(&d).ok_or(WriterError::UnknownDomain(d))?,
            ),
        };
        let old = word.load(Ordering::Relaxed);
        let generation = ((old >> ep_word::GENERATION_SHIFT) + 1) & ep_word::GENERATION_MASK;
        let new =
            kind | generation << ep_word::GENERATION_SHIFT | u64::from(root) << ep_word::ROOT_SHIFT;
        word.store(new, Ordering::Release);
        if old & ep_word::KIND_MASK != ep_word::KIND_BLOCKED {
            self.pending.endpoints.push(endpoint);
            self.pending.any = true;
        }
        match target {
            EndpointTarget::Domain(d) => self.endpoint_domain.insert(endpoint, d),
            _ => self.endpoint_domain.remove(&endpoint),
        };
        Ok(())
    }

    /// Publishes `[first, last]` → `gpa`. Visible to readers on return.
    pub fn map(
        &mut self,
        domain: u32,
        first: u64,
        last: u64,
        gpa: u64,
        perms: Perms,
    ) -> Result<(), WriterError> {
        let root = *self
            .domains
            .get(&domain)
            .ok_or(WriterError::UnknownDomain(domain))?;
        let bad = WriterError::BadRange { first, last, gpa };
        let aligned =
            first % layout::PAGE_SIZE == 0 && gpa % layout::PAGE_SIZE == 0 && last & 0xfff == 0xfff;
        if !aligned
            || last < first
            || !self.geometry.in_input_range(last)
            || gpa.checked_add(last - first).is_none()
        {
            return Err(bad);
        }
        if self.nodes_needed_bound(first, last, gpa) > self.available_for_mappings() {
            return Err(WriterError::ArenaFull(self.geometry.max_nodes()));
        }
        let flags = pte::PRESENT | pte::LEAF | perms.pte_bits();
        let mut iova = first;
        loop {
            let remaining = last - iova;
            let target = gpa + (iova - first);
            let level = (0..=layout::MAX_LEAF_LEVEL.min(self.levels - 1))
                .rev()
                .find(|&l| {
                    let span = layout::entry_span(l);
                    iova % span == 0 && target % span == 0 && remaining >= span - 1
                })
                .unwrap_or(0);
            let span = layout::entry_span(level);
            // Leaves of one size that follow each other in one node are
            // published in one walk: a run up to the node's end (where a
            // larger leaf may start) or the range's end.
            let in_node = layout::ENTRIES_PER_NODE - layout::entry_index(iova, level) as u64;
            // Whole spans left: (remaining + 1) / span, without overflow.
            let whole = remaining / span + u64::from(remaining % span == span - 1);
            let count = whole.clamp(1, in_node);
            if let Err(e) = self.set_leaves(root, iova, level, target | flags, count) {
                if iova > first {
                    // Take back what this call already published.
                    let _ = self.unmap_range(domain, root, first, iova - 1, false);
                }
                return Err(e);
            }
            match iova.checked_add(span * count) {
                Some(next) if next - 1 < last => iova = next,
                _ => return Ok(()),
            }
        }
    }

    /// Publishes `count` leaves of `leaf_level` from `iova` on, in one node
    /// (the caller keeps them there), the first with `value`, each next one
    /// a span further. Nothing is published if any of them is taken.
    fn set_leaves(
        &mut self,
        root: u32,
        iova: u64,
        leaf_level: u32,
        value: u64,
        count: u64,
    ) -> Result<(), WriterError> {
        if count == 1 {
            return self.set_leaf(root, iova, leaf_level, value);
        }
        let node = self.leaf_node(root, iova, leaf_level)?;
        let first = layout::entry_index(iova, leaf_level);
        let span = layout::entry_span(leaf_level);
        for k in 0..count as usize {
            if self.entry(node, first + k).load(Ordering::Relaxed) & pte::PRESENT != 0 {
                return Err(WriterError::Overlap(iova + k as u64 * span));
            }
        }
        for k in 0..count as usize {
            self.entry(node, first + k)
                .store(value + k as u64 * span, Ordering::Release);
        }
        self.live[node as usize] += count as u16;
        Ok(())
    }

    /// The node whose entries at `leaf_level` cover `iova`, created on the
    /// way down if missing; an existing larger leaf on the way is an
    /// overlap.
    fn leaf_node(&mut self, root: u32, iova: u64, leaf_level: u32) -> Result<u32, WriterError> {
        let mut node = root;
        let mut level = self.levels - 1;
        while level > leaf_level {
            let idx = layout::entry_index(iova, level);
            let e = self.entry(node, idx).load(Ordering::Relaxed);
            node = if e & pte::PRESENT == 0 {
                let child = self.alloc_node()?;
                self.entry(node, idx).store(
                    pte::PRESENT | u64::from(child) << pte::CHILD_SHIFT,
                    Ordering::Release,
                );
                self.live[node as usize] += 1;
                child
            } else if e & pte::LEAF != 0 {
                return Err(WriterError::Overlap(iova));
            } else {
                (e >> pte::CHILD_SHIFT) as u32
            };
            level -= 1;
        }
        Ok(node)
    }

    fn set_leaf(
        &mut self,
        root: u32,
        iova: u64,
        leaf_level: u32,
        value: u64,
    ) -> Result<(), WriterError> {
        let node = self.leaf_node(root, iova, leaf_level)?;
        let idx = layout::entry_index(iova, leaf_level);
        if self.entry(node, idx).load(Ordering::Relaxed) & pte::PRESENT != 0 {
            return Err(WriterError::Overlap(iova));
        }
        self.entry(node, idx).store(value, Ordering::Release);
        self.live[node as usize] += 1;
        Ok(())
    }

    /// The leaf holding `iova`: (its first IOVA, its last IOVA).
    fn leaf_bounds(&self, root: u32, iova: u64) -> Option<(u64, u64)> {
        let mut node = root;
        let mut level = self.levels - 1;
        loop {
            let e = self
                .entry(node, layout::entry_index(iova, level))
                .load(Ordering::Relaxed);
            if e & pte::PRESENT == 0 {
                return None;
            }
            if e & pte::LEAF != 0 {
                let span = layout::entry_span(level);
                let start = iova & !(span - 1);
                return Some((start, start + (span - 1)));
            }
            if level == 0 {
                return None;
            }
            node = (e >> pte::CHILD_SHIFT) as u32;
            level -= 1;
        }
    }

    /// Removes every leaf inside `[first, last]`. Readers may still use them
    /// until the next [`Self::synchronize`].
    pub fn unmap(&mut self, domain: u32, first: u64, last: u64) -> Result<(), WriterError> {
        let root = *self
            .domains
            .get(&domain)
            .ok_or(WriterError::UnknownDomain(domain))?;
        if first % layout::PAGE_SIZE != 0 || last & 0xfff != 0xfff || last < first {
            return Err(WriterError::BadRange {
                first,
                last,
                gpa: 0,
            });
        }
        self.unmap_range(domain, root, first, last, true)
    }

    fn unmap_range(
        &mut self,
        domain: u32,
        root: u32,
        first: u64,
        last: u64,
        check: bool,
    ) -> Result<(), WriterError> {
        // Entry indices wrap above the input range: never walk past it.
        let top_iova = match self.geometry.input_bits {
            64.. => u64::MAX,
            bits => (1u64 << bits) - 1,
        };
        if first > top_iova {
            return Ok(());
        }
        let last = last.min(top_iova);
        if check {
            if self
                .leaf_bounds(root, first)
                .is_some_and(|(start, _)| start < first)
            {
                return Err(WriterError::SplitsLeaf(first));
            }
            if self
                .leaf_bounds(root, last)
                .is_some_and(|(_, end)| end > last)
            {
                return Err(WriterError::SplitsLeaf(last));
            }
        }
        let top = self.levels - 1;
        let mut iova = first;
        let mut path = [(0u32, 0usize); layout::MAX_LEVELS as usize];
        loop {
            let mut depth = 0;
            let mut node = root;
            let mut level = top;
            let step = loop {
                let idx = layout::entry_index(iova, level);
                path[depth] = (node, idx);
                depth += 1;
                let e = self.entry(node, idx).load(Ordering::Relaxed);
                let span = layout::entry_span(level);
                let base = iova & !(span - 1);
                if e & pte::PRESENT == 0 {
                    break span - (iova - base);
                }
                if e & pte::LEAF != 0 || level == 0 {
                    // This leaf and the leaves after it in this node, up to
                    // `last`, in one walk; a child node ends the run.
                    let room = layout::ENTRIES_PER_NODE as usize - idx;
                    let wanted = usize::try_from((last - base) / span).map_or(room, |n| n + 1);
                    let mut done = 0;
                    while done < room.min(wanted) {
                        let entry = self.entry(node, idx + done);
                        let e = entry.load(Ordering::Relaxed);
                        if e & pte::PRESENT != 0 {
                            if e & pte::LEAF == 0 && level != 0 {
                                break;
                            }
                            entry.store(0, Ordering::Release);
                            self.live[node as usize] -= 1;
                        }
                        done += 1;
                    }
                    self.prune(&path[..depth]);
                    break base.wrapping_add(done as u64 * span).wrapping_sub(iova);
                }
                node = (e >> pte::CHILD_SHIFT) as u32;
                level -= 1;
            };
            match iova.checked_add(step) {
                Some(next) if next <= last && next != 0 => iova = next,
                _ => break,
            }
        }
        self.pending.ranges.push((domain, first, last));
        self.pending.any = true;
        Ok(())
    }

    /// Detaches emptied nodes along `path` (root excluded), bottom up.
    fn prune(&mut self, path: &[(u32, usize)]) {
        for w in (1..path.len()).rev() {
            let (node, _) = path[w];
            if self.live[node as usize] != 0 {
                return;
            }
            let (parent, idx) = path[w - 1];
            self.entry(parent, idx).store(0, Ordering::Release);
            self.live[parent as usize] -= 1;
            self.retired.push(node);
        }
    }

    /// Destroys a domain and every mapping in it. Endpoints still attached
    /// are blocked.
    pub fn destroy_domain(&mut self, domain: u32) -> Result<(), WriterError> {
        let root = self
            .domains
            .remove(&domain)
            .ok_or(WriterError::UnknownDomain(domain))?;
        let attached: Vec<u32> = self
            .endpoint_domain
            .iter()
            .filter(|(_, d)| **d == domain)
            .map(|(e, _)| *e)
            .collect();
        for e in attached {
            // The domain is gone from `domains`, so block directly.
            let word = self.endpoint_word(e)?;
            let old = word.load(Ordering::Relaxed);
            let generation = ((old >> ep_word::GENERATION_SHIFT) + 1) & ep_word::GENERATION_MASK;
            word.store(
                ep_word::KIND_BLOCKED | generation << ep_word::GENERATION_SHIFT,
                Ordering::Release,
            );
            self.endpoint_domain.remove(&e);
            self.pending.endpoints.push(e);
        }
        let mut stack = vec![(root, self.levels - 1)];
        while let Some((node, level)) = stack.pop() {
            if level > 0 {
                for i in 0..layout::ENTRIES_PER_NODE as usize {
                    let e = self.entry(node, i).load(Ordering::Relaxed);
                    if e & pte::PRESENT != 0 && e & pte::LEAF == 0 {
                        stack.push(((e >> pte::CHILD_SHIFT) as u32, level - 1));
                    }
                }
            }
            self.retired.push(node);
        }
        self.pending.any = true;
        Ok(())
    }

    /// Empties the table for a new device (a new VMM connection): every
    /// domain destroyed, every endpoint blocked, then one grace period.
    /// Readers keep their files and slots.
    pub fn reset(&mut self) -> GraceReport {
        let domains: Vec<u32> = self.domains.keys().copied().collect();
        for d in domains {
            let _ = self.destroy_domain(d);
        }
        for i in 0..u64::from(self.geometry.endpoint_count) {
            let word = self.table.word(layout::endpoint_offset(i));
            let old = word.load(Ordering::Relaxed);
            if old & ep_word::KIND_MASK != ep_word::KIND_BLOCKED {
                let generation =
                    ((old >> ep_word::GENERATION_SHIFT) + 1) & ep_word::GENERATION_MASK;
                word.store(
                    ep_word::KIND_BLOCKED | generation << ep_word::GENERATION_SHIFT,
                    Ordering::Release,
                );
                // Pins of this endpoint are stale now.
                self.pending
                    .endpoints
                    .push(self.geometry.endpoint_base + i as u32);
                self.pending.any = true;
            }
        }
        self.endpoint_domain.clear();
        self.synchronize()
    }
}
