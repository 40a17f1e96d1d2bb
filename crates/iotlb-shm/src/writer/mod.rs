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
//!
//! One file per job: `types` (the public types, re-exported here), `nodes`
//! (arena nodes: allocation, the root reserve, growth), `radix` (the
//! per-domain radix trees: map, unmap, endpoints, domains) and
//! `grace_period` (the grace-period driver and its stall/kill policy, with
//! the spin/yield/sleep thresholds); this file holds the writer itself, its
//! files and its readers.

mod grace_period;
mod nodes;
mod radix;
mod types;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::drain::{TrackError, TrackedIo};
use crate::geometry::Geometry;
use crate::layout::{self, header};
use crate::liveness::LivenessOwner;
use crate::memfd::{self, SharedMapping};
use crate::registry::{ReaderId, ReaderProcess, ReaderState, Registry, Released};
use crate::sync::{AtomicU64, Ordering};

use types::io;
pub use types::{
    EndpointTarget, GraceReport, Perms, StallPolicy, WriterConfig, WriterError, WriterStats,
};

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
        if config.handover {
            put(header::HANDOVER, layout::HANDOVER_VALUE);
        }
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

    /// Registers the slot file a previous writer gave `process`, which
    /// retired it and hands it over ([`Registry::register_previous`]). The
    /// grace periods of this writer do not cover it: its sessions and pins
    /// are in another table. Wait for it with
    /// [`Self::release_previous_readers`] before completing a revocation.
    pub fn register_previous(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        process: ReaderProcess,
        current: Option<ReaderId>,
    ) -> Result<ReaderId, WriterError> {
        Ok(self.readers.register_previous(slots_fd, process, current)?)
    }

    /// [`Registry::register_previous_of_gone`].
    pub fn register_previous_of_gone(
        &mut self,
        slots_fd: BorrowedFd<'_>,
        pid: i32,
    ) -> Result<ReaderId, WriterError> {
        Ok(self.readers.register_previous_of_gone(slots_fd, pid)?)
    }

    /// Numbers the readers registered from now on from `first`
    /// ([`Registry::number_from`]).
    pub fn number_readers_from(&mut self, first: u64) {
        self.readers.number_from(first);
    }

    /// Previous slot files still registered ([`Self::register_previous`]).
    pub fn previous_readers(&self) -> usize {
        self.readers
            .readers()
            .iter()
            .filter(|r| r.previous())
            .count()
    }

    /// Releases the readers that nothing holds any more (every kind), and
    /// returns how many previous slot files are still in use.
    pub fn release_previous_readers(&mut self) -> usize {
        if self.previous_readers() == 0 {
            return 0;
        }
        self.release_finished_readers();
        self.previous_readers()
    }

    /// Sends SIGKILL to the processes of the previous slot files still in
    /// use (the stall policy), once each.
    pub fn kill_previous_readers(&mut self) {
        for r in self.readers.readers().iter().filter(|r| r.previous()) {
            if r.kill_state() != crate::registry::KillState::None {
                continue;
            }
            match r.kill() {
                Ok(()) => {
                    self.stats.kills += 1;
                    tracing::error!(
                        pid = r.pid,
                        "killed a backend still using the previous daemon's table past --stall-kill-ms"
                    );
                }
                Err(e) => {
                    self.stats.kill_failures += 1;
                    tracing::error!(pid = r.pid, error = %e, "could not kill a backend still using the previous daemon's table");
                }
            }
        }
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
}

impl Drop for TableWriter {
    /// Marks the table detached before its files can go away: readers'
    /// sessions fault from now on.
    fn drop(&mut self) {
        drop(self.liveness.take());
    }
}
