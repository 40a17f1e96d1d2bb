//! The writer side, used by the daemon: owns the table and arena files,
//! applies the device model's changes, and runs grace periods.
//!
//! Widening changes (a new mapping, an endpoint leaving the blocked state)
//! are visible to readers as soon as the call returns: the entry is stored
//! with Release before the daemon writes the used ring. Narrowing changes
//! (unmap, an endpoint leaving its domain or bypass, a domain destroyed) are
//! recorded as pending; [`TableWriter::synchronize`] runs one grace period
//! for all of them, after which the requests may complete and detached
//! nodes are reused.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::drain::{TrackError, TrackedIo};
use crate::geometry::{Geometry, GeometryError};
use crate::grace;
use crate::layout::{self, endpoint as ep_word, header, pte};
use crate::liveness::LivenessOwner;
use crate::memfd::{self, SharedMapping};
use crate::registry::{
    KillState, Reader, ReaderId, ReaderProcess, ReaderState, RegisterError, Registry, Released,
};
use crate::sync::{AtomicU64, Ordering};

/// Where an endpoint's DMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointTarget {
    /// Faults (reason DOMAIN).
    Blocked,
    /// Untranslated.
    Bypass,
    /// Through this domain's mappings.
    Domain(u32),
}

/// Permissions of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
    /// The target is MMIO.
    pub mmio: bool,
}

impl Perms {
    fn pte_bits(self) -> u64 {
        (if self.read { pte::READ } else { 0 })
            | (if self.write { pte::WRITE } else { 0 })
            | (if self.mmio { pte::MMIO } else { 0 })
    }
}

/// What the writer does about a reader that stays in a session (or holds
/// a pin the grace period waits for) too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallPolicy {
    /// Log a warning and count a stall after this long (default 100 ms).
    pub warn_after: Duration,
    /// Send the reader process SIGKILL (through its pidfd) after this long;
    /// `None` (the default) never kills, because killing a backend is the
    /// operator's call. A kill only ends the wait once it worked: the
    /// process is gone and the I/O it registered has drained. A kill the
    /// kernel refuses (the writer lacks the permission) is logged and
    /// counted, and the writer keeps waiting.
    pub kill_after: Option<Duration>,
}

impl Default for StallPolicy {
    fn default() -> Self {
        Self {
            warn_after: Duration::from_millis(100),
            kill_after: None,
        }
    }
}

/// Writer settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterConfig {
    /// The table's shape.
    pub geometry: Geometry,
    /// Stuck-reader policy.
    pub stall: StallPolicy,
    /// Nodes kept back for domain roots: mappings never use the last
    /// `reserved_roots − domains` free nodes, so creating a domain (up to
    /// this many) never fails for lack of space. Set it to the device's
    /// domain limit.
    pub reserved_roots: u32,
}

/// A writer operation that failed; the table is unchanged.
#[derive(Debug, Error)]
pub enum WriterError {
    /// The geometry cannot be laid out.
    #[error("table geometry")]
    Geometry(#[from] GeometryError),
    /// Creating, growing, sealing or mapping a file failed.
    #[error("table files: {step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The arena is at its maximum size.
    #[error("translation table full ({0} nodes)")]
    ArenaFull(u64),
    /// No such domain.
    #[error("domain {0} does not exist in the table")]
    UnknownDomain(u32),
    /// The domain already exists.
    #[error("domain {0} already exists in the table")]
    DomainExists(u32),
    /// The endpoint has no word.
    #[error("endpoint {0:#x} is outside the table's endpoint range")]
    UnknownEndpoint(u32),
    /// Not 4 KiB aligned, empty, or outside the input range.
    #[error("range {first:#x}-{last:#x} (to {gpa:#x}) is misaligned or outside the input range")]
    BadRange {
        /// First IOVA.
        first: u64,
        /// Last IOVA.
        last: u64,
        /// Guest-physical start (0 for unmap).
        gpa: u64,
    },
    /// The range overlaps an existing mapping.
    #[error("mapping at {0:#x} overlaps an existing one")]
    Overlap(u64),
    /// An unmap would cut a leaf in two.
    #[error("unmap boundary {0:#x} falls inside a mapping")]
    SplitsLeaf(u64),
    /// A reader could not be registered.
    #[error("registering a reader")]
    Register(#[from] RegisterError),
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> WriterError {
    move |source| WriterError::Io { step, source }
}

/// Counters of the writer's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Grace periods run.
    pub grace_periods: u64,
    /// Grace periods that had to wait for at least one reader.
    pub grace_waits: u64,
    /// Stalls past the warning bound.
    pub stalls: u64,
    /// Readers the stall policy sent SIGKILL.
    pub kills: u64,
    /// Kills the kernel refused (the reader was waited for instead).
    pub kill_failures: u64,
    /// Readers released after their process exited (or closed its slot
    /// file) while a grace period waited for them, or found so by
    /// [`TableWriter::release_finished_readers`].
    pub reaped: u64,
    /// Nodes in use (reachable or waiting for a grace period).
    pub nodes_in_use: u64,
    /// Segments in the arena file.
    pub segments: u64,
}

/// What one grace period did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraceReport {
    /// The epoch published.
    pub epoch: u64,
    /// Whether any reader or pin had to be waited for.
    pub waited: bool,
    /// Readers released meanwhile (gone and drained, or closed).
    pub reaped: usize,
}

#[derive(Debug, Default)]
struct Pending {
    ranges: Vec<(u32, u64, u64)>,
    endpoints: Vec<u32>,
    any: bool,
}

/// The daemon's handle on the shared table.
#[derive(Debug)]
pub struct TableWriter {
    geometry: Geometry,
    levels: u32,
    stall: StallPolicy,
    table_fd: OwnedFd,
    arena_fd: OwnedFd,
    table: SharedMapping,
    arena: SharedMapping,
    segments: u64,
    fresh: u64,
    live: Vec<u16>,
    free: Vec<u32>,
    retired: Vec<u32>,
    domains: HashMap<u32, u32>,
    endpoint_domain: HashMap<u32, u32>,
    pending: Pending,
    readers: Registry,
    stats: WriterStats,
    stall_counted: bool,
    reserved_roots: u64,
    /// Keeps the header's liveness word alive; dropped first.
    liveness: Option<LivenessOwner>,
}

impl TableWriter {
    /// Creates the table and arena memfds, writes the header, seals them
    /// read-only for everyone else. Every endpoint starts blocked.
    pub fn new(config: &WriterConfig) -> Result<Self, WriterError> {
        let g = config.geometry;
        g.validate()?;
        let table_fd =
            memfd::create(c"iotlb-table", g.table_bytes()).map_err(io("create table memfd"))?;
        let arena_fd =
            memfd::create(c"iotlb-arena", g.segment_bytes()).map_err(io("create arena memfd"))?;
        let len = |b: u64| {
            usize::try_from(b).map_err(|_| io("size")(std::io::ErrorKind::InvalidInput.into()))
        };
        let table = SharedMapping::map(table_fd.as_fd(), len(g.table_bytes())?, true)
            .map_err(io("map table"))?;
        let arena = SharedMapping::map(arena_fd.as_fd(), len(g.arena_bytes())?, true)
            .map_err(io("map arena"))?;
        let put = |o, v| table.word(o).store(v, Ordering::Relaxed);
        put(header::VERSION, layout::VERSION);
        put(header::ENDPOINT_BASE, u64::from(g.endpoint_base));
        put(header::ENDPOINT_COUNT, u64::from(g.endpoint_count));
        put(header::LEVELS, u64::from(g.levels()));
        put(header::INPUT_BITS, u64::from(g.input_bits));
        put(header::SEGMENT_NODES, u64::from(g.segment_nodes));
        put(header::MAX_SEGMENTS, u64::from(g.max_segments));
        put(header::EPOCH, 1);
        put(header::SEGMENTS, 1);
        put(header::WRITER_PID, u64::from(std::process::id()));
        table
            .word(header::MAGIC)
            .store(layout::TABLE_MAGIC, Ordering::Release);
        memfd::seal(table_fd.as_fd(), memfd::SEALS_FROZEN_READ_ONLY).map_err(io("seal table"))?;
        memfd::seal(arena_fd.as_fd(), memfd::SEALS_GROWABLE_READ_ONLY).map_err(io("seal arena"))?;
        // SAFETY: the word is 8-aligned in our writable table mapping, which
        // lives in `Self` until after the owner is dropped (see `Drop`).
        let liveness = unsafe { LivenessOwner::start(table.word(header::LIVENESS)) }
            .map_err(io("start the liveness thread"))?;
        Ok(Self {
            geometry: g,
            levels: g.levels(),
            stall: config.stall,
            table_fd,
            arena_fd,
            table,
            arena,
            segments: 1,
            fresh: 0,
            live: vec![0; g.segment_nodes as usize],
            free: Vec::new(),
            retired: Vec::new(),
            domains: HashMap::new(),
            endpoint_domain: HashMap::new(),
            pending: Pending::default(),
            readers: Registry::default(),
            stats: WriterStats {
                segments: 1,
                ..WriterStats::default()
            },
            stall_counted: false,
            reserved_roots: u64::from(config.reserved_roots),
            liveness: Some(liveness),
        })
    }

    /// The table file (hand it to readers).
    pub fn table_fd(&self) -> BorrowedFd<'_> {
        self.table_fd.as_fd()
    }

    /// The arena file (hand it to readers).
    pub fn arena_fd(&self) -> BorrowedFd<'_> {
        self.arena_fd.as_fd()
    }

    /// The table's shape.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            nodes_in_use: self.fresh - self.free.len() as u64,
            segments: self.segments,
            ..self.stats
        }
    }

    /// Bytes of the arena file in use (diagnostics and the bytes-per-mapping
    /// figure).
    pub fn shared_bytes(&self) -> u64 {
        self.stats().nodes_in_use * layout::NODE_BYTES + self.geometry.table_bytes()
    }

    /// Whether narrowing changes await a grace period.
    pub fn needs_grace(&self) -> bool {
        self.pending.any || !self.retired.is_empty()
    }

    /// Registered readers.
    pub fn readers(&self) -> &Registry {
        &self.readers
    }

    /// Registers process `pid`, which has no connection to watch, and its
    /// slot file (see [`crate::slots::create`]).
    pub fn register_reader(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        pid: i32,
    ) -> Result<ReaderId, WriterError> {
        let process = ReaderProcess::watch(pid)?;
        Ok(self.readers.register(slots_fd, process)?)
    }

    /// Registers a reader process, watched as `process` says, and its slot
    /// file.
    pub fn register_process(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        process: ReaderProcess,
    ) -> Result<ReaderId, WriterError> {
        Ok(self.readers.register(slots_fd, process)?)
    }

    /// Tracks an io_uring or zero-copy socket of reader `id`: once the
    /// reader's process is gone, its slots and pins keep counting until it
    /// has drained (see [`crate::drain`]).
    pub fn track_io(&mut self, id: ReaderId, io: TrackedIo) -> Result<(), TrackError> {
        self.readers.track(id, io)
    }

    /// Forgets a reader unconditionally. Only for a reader that never
    /// received its slot file; every other one is released by the rules of
    /// [`crate::registry`] ([`Self::release_finished_readers`],
    /// [`Self::try_release_reader`], or a grace period that waits for it).
    pub fn unregister_reader(&mut self, id: ReaderId) -> bool {
        self.readers.remove(id)
    }

    /// Releases every reader that nothing can hold any more.
    pub fn release_finished_readers(&mut self) -> Vec<Released> {
        let gone = self.readers.release_finished();
        for r in &gone {
            tracing::info!(
                reader = r.id.0,
                pid = r.pid,
                reason = ?r.reason,
                "backend released: its slots and pins no longer count"
            );
        }
        self.stats.reaped += gone.len() as u64;
        gone
    }

    /// Releases reader `id` if nothing can hold it any more; see
    /// [`Registry::try_release`].
    pub fn try_release_reader(&mut self, id: ReaderId) -> Option<ReaderState> {
        let state = self.readers.try_release(id);
        if let Some(ReaderState::Released(_)) = state {
            self.stats.reaped += 1;
        }
        state
    }

    fn entry(&self, node: u32, index: usize) -> &AtomicU64 {
        self.arena
            .word(node as usize * layout::NODE_BYTES as usize + index * 8)
    }

    fn endpoint_word(&self, endpoint: u32) -> Result<&AtomicU64, WriterError> {
        let i = self
            .geometry
            .endpoint_index(endpoint)
            .ok_or(WriterError::UnknownEndpoint(endpoint))?;
        Ok(self.table.word(layout::endpoint_offset(i)))
    }

    /// Nodes that can still be handed out (free now, reclaimable after a
    /// grace period, or never used).
    pub fn available_nodes(&self) -> u64 {
        self.geometry.max_nodes() - self.fresh + self.free.len() as u64 + self.retired.len() as u64
    }

    /// Nodes mappings may still use (the root reserve set aside).
    fn available_for_mappings(&self) -> u64 {
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
    fn nodes_needed_bound(&self, first: u64, last: u64, gpa: u64) -> u64 {
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

    fn alloc_node(&mut self) -> Result<u32, WriterError> {
        if self.available_for_mappings() == 0 {
            return Err(WriterError::ArenaFull(self.geometry.max_nodes()));
        }
        self.alloc_any_node()
    }

    fn alloc_any_node(&mut self) -> Result<u32, WriterError> {
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
            if let Err(e) = self.set_leaf(root, iova, level, target | flags) {
                if iova > first {
                    // Take back what this call already published.
                    let _ = self.unmap_range(domain, root, first, iova - 1, false);
                }
                return Err(e);
            }
            let span = layout::entry_span(level);
            match iova.checked_add(span) {
                Some(next) if next - 1 < last => iova = next,
                _ => return Ok(()),
            }
        }
    }

    fn set_leaf(
        &mut self,
        root: u32,
        iova: u64,
        leaf_level: u32,
        value: u64,
    ) -> Result<(), WriterError> {
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
        let mut path: Vec<(u32, usize)> = Vec::with_capacity(self.levels as usize);
        loop {
            path.clear();
            let mut node = root;
            let mut level = top;
            let step = loop {
                let idx = layout::entry_index(iova, level);
                path.push((node, idx));
                let e = self.entry(node, idx).load(Ordering::Relaxed);
                let span = layout::entry_span(level);
                if e & pte::PRESENT == 0 {
                    break span - (iova & (span - 1));
                }
                if e & pte::LEAF != 0 || level == 0 {
                    self.entry(node, idx).store(0, Ordering::Release);
                    self.live[node as usize] -= 1;
                    self.prune(&path);
                    break span - (iova & (span - 1));
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

    /// Runs one grace period if anything needs it: publishes a new epoch,
    /// waits until no reader session predates it and no pin overlaps what
    /// was revoked, then makes detached nodes reusable. Dead readers are
    /// reclaimed on the way; stuck ones are handled by the [`StallPolicy`].
    pub fn synchronize(&mut self) -> GraceReport {
        if !self.needs_grace() {
            return GraceReport {
                epoch: self.table.word(header::EPOCH).load(Ordering::Relaxed),
                ..GraceReport::default()
            };
        }
        let epoch = grace::advance(self.table.word(header::EPOCH));
        let mut report = GraceReport {
            epoch,
            ..GraceReport::default()
        };
        let started = Instant::now();
        let mut warned = false;
        self.stall_counted = false;
        let mut r = 0;
        while r < self.readers.len() {
            let mut end = WaitEnd::Done;
            let slots = self.readers.get(r).map_or(0, |x| x.slots.slots_in_use());
            for s in 0..slots {
                let quiet = |reader: &Reader| grace::quiescent_since(reader.slots.slot(s), epoch);
                if self.readers.get(r).is_some_and(|x| !quiet(x)) {
                    report.waited = true;
                    end = self.wait_for(r, started, &mut warned, "in a session", quiet);
                    if end != WaitEnd::Done {
                        break;
                    }
                }
            }
            if self.settle(r, end, warned) {
                report.reaped += 1;
            } else {
                r += 1;
            }
        }
        if !self.pending.ranges.is_empty() || !self.pending.endpoints.is_empty() {
            report.reaped += self.wait_for_pins(started, &mut warned, &mut report.waited);
        }
        self.pending = Pending::default();
        self.free.append(&mut self.retired);
        self.stats.grace_periods += 1;
        self.stats.grace_waits += u64::from(report.waited);
        report
    }

    fn pin_matters(&self, endpoint: u64, first: u64, last: u64) -> bool {
        let Ok(endpoint) = u32::try_from(endpoint) else {
            return false;
        };
        if self.pending.endpoints.contains(&endpoint) {
            return true;
        }
        let Some(d) = self.endpoint_domain.get(&endpoint) else {
            return false;
        };
        self.pending
            .ranges
            .iter()
            .any(|(rd, f, l)| rd == d && first <= *l && *f <= last)
    }

    fn wait_for_pins(&mut self, started: Instant, warned: &mut bool, waited: &mut bool) -> usize {
        let mut reaped = 0;
        let mut r = 0;
        while r < self.readers.len() {
            let mut end = WaitEnd::Done;
            let pins = self.readers.get(r).map_or(0, |x| x.slots.pins_in_use());
            for j in 0..pins {
                let Some(snap) = self.readers.get(r).and_then(|x| {
                    let (state, fields) = x.slots.pin(j);
                    grace::read_pin(state, fields)
                }) else {
                    continue;
                };
                if !self.pin_matters(snap.endpoint, snap.first, snap.last) {
                    continue;
                }
                *waited = true;
                let released = |reader: &Reader| {
                    let (state, _) = reader.slots.pin(j);
                    !grace::pin_still_held(state, &snap)
                };
                end = self.wait_for(r, started, warned, "holding a pin", released);
                if end != WaitEnd::Done {
                    break;
                }
            }
            if self.settle(r, end, *warned) {
                reaped += 1;
            } else {
                r += 1;
            }
        }
        reaped
    }

    /// Books the end of a wait on reader `r`; true if it was removed.
    fn settle(&mut self, r: usize, end: WaitEnd, warned: bool) -> bool {
        if warned && !self.stall_counted {
            self.stall_counted = true;
            self.stats.stalls += 1;
        }
        let Some(reader) = self.readers.get(r) else {
            return false;
        };
        let (id, pid) = (reader.id, reader.pid);
        match end {
            WaitEnd::Done => false,
            WaitEnd::Released(state) => {
                tracing::warn!(
                    pid,
                    reader = id.0,
                    "backend {}: released while a grace period waited for it",
                    state.describe()
                );
                self.stats.reaped += 1;
                self.readers.remove(id)
            }
        }
    }

    /// Spins, then yields, then sleeps until `done(reader r)`, or until the
    /// reader can be released ([`crate::registry`]); applies the stall
    /// policy to it meanwhile.
    fn wait_for(
        &mut self,
        r: usize,
        started: Instant,
        warned: &mut bool,
        what: &str,
        done: impl Fn(&Reader) -> bool,
    ) -> WaitEnd {
        let mut spins = 0u32;
        let mut next_check = Instant::now();
        let mut next_reminder = None;
        loop {
            let Some(reader) = self.readers.get(r) else {
                return WaitEnd::Done;
            };
            if done(reader) {
                return WaitEnd::Done;
            }
            spins = spins.saturating_add(1);
            if spins < 2048 {
                crate::sync::relax();
                continue;
            }
            let now = Instant::now();
            if now < next_check {
                backoff(spins);
                continue;
            }
            // The release check makes system calls: at most once a ms.
            next_check = now + Duration::from_millis(1);
            let state = reader.state();
            if let ReaderState::Released(_) = state {
                return WaitEnd::Released(state);
            }
            let elapsed = started.elapsed();
            let (pid, kill) = (reader.pid, reader.kill_state());
            if (!*warned && elapsed >= self.stall.warn_after)
                || next_reminder.is_some_and(|t| now >= t)
            {
                *warned = true;
                next_reminder = Some(now + STALL_REMINDER);
                tracing::warn!(
                    pid,
                    waited_ms = elapsed.as_millis() as u64,
                    backend = state.describe(),
                    "a backend {what} is holding a grace period back (UNMAP/DETACH waits for it)"
                );
            }
            if kill == KillState::None
                && matches!(state, ReaderState::Active | ReaderState::Lingering)
                && self.stall.kill_after.is_some_and(|k| elapsed >= k)
            {
                match reader.kill() {
                    Ok(()) => {
                        self.stats.kills += 1;
                        tracing::error!(
                            pid,
                            "killed a backend stuck past --stall-kill-ms; waiting for it to exit and for its I/O to drain"
                        );
                    }
                    Err(e) => {
                        self.stats.kill_failures += 1;
                        tracing::error!(
                            pid,
                            error = %e,
                            "could not kill a stuck backend (the daemon needs CAP_KILL or the backend's uid); waiting for it instead"
                        );
                    }
                }
            }
            backoff(spins);
        }
    }
}

/// How long a grace period waits before it repeats its stall warning.
const STALL_REMINDER: Duration = Duration::from_secs(10);

fn backoff(spins: u32) {
    if spins < 4096 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl Drop for TableWriter {
    /// Marks the table detached before its files can go away: readers'
    /// sessions fault from now on.
    fn drop(&mut self) {
        drop(self.liveness.take());
    }
}

/// How a wait on one reader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitEnd {
    /// The slot or pin was released.
    Done,
    /// The reader may be released ([`crate::registry`]): gone and drained,
    /// or closed.
    Released(ReaderState),
}
