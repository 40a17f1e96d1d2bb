//! The reader side, used by backends: open the table read-only, claim a
//! slot per thread, translate inside sessions, pin ranges for I/O that
//! outlives a session.
//!
//! A lookup is a handful of Acquire loads of the shared table: no syscall,
//! no locked read-modify-write, no store to a shared line. Entering and
//! leaving a session each store once to the thread's own slot line.

use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use thiserror::Error;

use crate::access::{Access, Fault, FaultKind, Piece};
use crate::geometry::{Geometry, GeometryError};
use crate::grace;
use crate::layout::{self, endpoint as ep_word, header, pte};
use crate::memfd::{self, SharedMapping};
use crate::slots::{SlotError, SlotFile};
use crate::sync::Ordering;

/// Failure to open a table.
#[derive(Debug, Error)]
pub enum OpenError {
    /// Reading, checking or mapping a file failed.
    #[error("table: {step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a table file of this layout version.
    #[error("not a layout-v2 translation table (magic {magic:#x}, version {version})")]
    Format {
        /// Magic found.
        magic: u64,
        /// Version found.
        version: u64,
    },
    /// The header describes an impossible shape.
    #[error("table header")]
    Geometry(#[from] GeometryError),
    /// The file is smaller than its header says, or not sealed read-only.
    #[error("{file} file is not sealed read-only at its size (seals {seals:#x}, {size} bytes)")]
    Seals {
        /// Which file.
        file: &'static str,
        /// Seals found.
        seals: i32,
        /// Size found.
        size: u64,
    },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> OpenError {
    move |source| OpenError::Io { step, source }
}

/// A table opened read-only.
#[derive(Debug)]
pub struct TableReader {
    table: SharedMapping,
    arena: SharedMapping,
    geometry: Geometry,
    levels: u32,
    max_nodes: u64,
    /// The table stays usable after its writer died ([`header::HANDOVER`]).
    handover: bool,
}

impl TableReader {
    /// Opens a table from its two descriptors (table file, arena file).
    pub fn open(table: BorrowedFd<'_>, arena: BorrowedFd<'_>) -> Result<Self, OpenError> {
        let size = memfd::size(table).map_err(io("stat table"))?;
        let seals = memfd::seals(table).map_err(io("read table seals"))?;
        let need = libc::F_SEAL_SHRINK | libc::F_SEAL_FUTURE_WRITE;
        if seals & need != need || size < header::BYTES as u64 {
            return Err(OpenError::Seals {
                file: "table",
                seals,
                size,
            });
        }
        let head = SharedMapping::map(table, header::BYTES, false).map_err(io("map header"))?;
        let w = |o| head.word(o).load(Ordering::Acquire);
        let (magic, version) = (w(header::MAGIC), w(header::VERSION));
        if magic != layout::TABLE_MAGIC || version != layout::VERSION {
            return Err(OpenError::Format { magic, version });
        }
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let geometry = Geometry {
            endpoint_base: narrow(w(header::ENDPOINT_BASE)),
            endpoint_count: narrow(w(header::ENDPOINT_COUNT)),
            input_bits: narrow(w(header::INPUT_BITS)),
            segment_nodes: narrow(w(header::SEGMENT_NODES)),
            max_segments: narrow(w(header::MAX_SEGMENTS)),
        };
        geometry.validate()?;
        let handover = w(header::HANDOVER) == layout::HANDOVER_VALUE;
        if u64::from(geometry.levels()) != w(header::LEVELS) || size < geometry.table_bytes() {
            return Err(OpenError::Seals {
                file: "table",
                seals,
                size,
            });
        }
        let arena_seals = memfd::seals(arena).map_err(io("read arena seals"))?;
        if arena_seals & need != need {
            let size = memfd::size(arena).map_err(io("stat arena"))?;
            return Err(OpenError::Seals {
                file: "arena",
                seals: arena_seals,
                size,
            });
        }
        let table_len = usize::try_from(geometry.table_bytes())
            .map_err(|_| io("size")(std::io::ErrorKind::InvalidData.into()))?;
        let arena_len = usize::try_from(geometry.arena_bytes())
            .map_err(|_| io("size")(std::io::ErrorKind::InvalidData.into()))?;
        let table = SharedMapping::map(table, table_len, false).map_err(io("map table"))?;
        let arena = SharedMapping::map(arena, arena_len, false).map_err(io("map arena"))?;
        Ok(Self {
            table,
            arena,
            levels: geometry.levels(),
            max_nodes: geometry.max_nodes(),
            geometry,
            handover,
        })
    }

    /// The table's shape.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The current global epoch (diagnostics).
    pub fn epoch(&self) -> u64 {
        self.table.word(header::EPOCH).load(Ordering::Acquire)
    }

    /// Whether the daemon that writes this table is still alive. Once it is
    /// not, every session faults ([`FaultKind::Detached`]), unless the
    /// table is [`Self::handed_over`].
    pub fn writer_alive(&self) -> bool {
        grace::writer_alive(self.table.word(header::LIVENESS))
    }

    /// Whether the table stays usable once its daemon is gone, frozen as
    /// it was, until this process connects to the restarted daemon and
    /// hands its slot file over (`docs/shm-layout.md`, "Restarts"): the
    /// daemon runs with `--state-dir` and the next one waits for this
    /// process before completing any revocation.
    pub fn handed_over(&self) -> bool {
        self.handover
    }

    /// Segments currently in the arena (diagnostics).
    pub fn segments(&self) -> u64 {
        self.table.word(header::SEGMENTS).load(Ordering::Acquire)
    }

    /// Base address of the read-only table mapping (for tests that check
    /// that it cannot be written).
    pub fn table_ptr(&self) -> *const u8 {
        self.table.as_ptr()
    }

    /// Where `endpoint`'s DMA goes now: bypass, a domain's root node, or
    /// the fault (blocked or unknown endpoint).
    #[inline]
    fn target(&self, endpoint: u32) -> Result<Target, FaultKind> {
        let i = self
            .geometry
            .endpoint_index(endpoint)
            .ok_or(FaultKind::Domain)?;
        let word = self
            .table
            .word(layout::endpoint_offset(i))
            .load(Ordering::Acquire);
        match word & ep_word::KIND_MASK {
            ep_word::KIND_BYPASS => Ok(Target::Bypass),
            ep_word::KIND_DOMAIN => Ok(Target::Root(word >> ep_word::ROOT_SHIFT)),
            _ => Err(FaultKind::Domain),
        }
    }

    /// The arena word of entry `index` of `node`.
    ///
    /// # Safety
    /// `node < self.max_nodes` and `index < 512`.
    #[inline(always)]
    unsafe fn entry(&self, node: u64, index: usize) -> &crate::sync::AtomicU64 {
        let offset = (node * layout::NODE_BYTES) as usize + index * 8;
        // SAFETY: node < max_nodes and index < 512 (caller), so the offset
        // is 8-aligned and inside the arena mapping, which is max_nodes ×
        // 4096 bytes long.
        unsafe { self.arena.word_unchecked(offset) }
    }

    /// Walks the table for `iova`: the leaf entry and its level, or the
    /// fault. Every index is bounded before it is used.
    #[inline]
    fn walk(&self, endpoint: u32, iova: u64) -> Result<Walked, FaultKind> {
        let Target::Root(root) = self.target(endpoint)? else {
            return Ok(Walked::Bypass);
        };
        self.walk_from(root, iova)
    }

    /// [`Self::walk`] below the endpoint word, from `root`.
    #[inline]
    fn walk_from(&self, root: u64, iova: u64) -> Result<Walked, FaultKind> {
        if !self.geometry.in_input_range(iova) {
            return Err(FaultKind::Mapping);
        }
        let mut node = root;
        let mut level = self.levels - 1;
        loop {
            if node >= self.max_nodes {
                return Err(FaultKind::Mapping);
            }
            // SAFETY: node < max_nodes (checked) and an entry index < 512.
            let e = unsafe { self.entry(node, layout::entry_index(iova, level)) }
                .load(Ordering::Acquire);
            if e & pte::PRESENT == 0 {
                return Err(FaultKind::Mapping);
            }
            if e & pte::LEAF != 0 {
                if level > layout::MAX_LEAF_LEVEL {
                    return Err(FaultKind::Mapping);
                }
                return Ok(Walked::Leaf {
                    entry: e,
                    span: layout::entry_span(level),
                });
            }
            if level == 0 {
                return Err(FaultKind::Mapping);
            }
            node = e >> pte::CHILD_SHIFT;
            level -= 1;
        }
    }
}

/// Where an endpoint's DMA goes, from its endpoint word.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Untranslated.
    Bypass,
    /// Through the radix table rooted at this node.
    Root(u64),
}

/// What a walk found.
#[derive(Debug, Clone, Copy)]
enum Walked {
    /// The endpoint bypasses translation.
    Bypass,
    /// A leaf entry covering `span` bytes.
    Leaf { entry: u64, span: u64 },
}

/// A fault record.
#[inline]
fn fault(kind: FaultKind, endpoint: u32, iova: u64, access: Access) -> Fault {
    Fault {
        kind,
        endpoint,
        iova,
        access,
    }
}

/// What a bypassed IOVA translates to: itself, to the end of the space.
#[inline]
fn bypass_piece(iova: u64) -> Piece {
    Piece {
        gpa: iova,
        len: (u64::MAX - iova).saturating_add(1),
        mmio: false,
    }
}

/// The last leaf a session used: valid for the rest of that session (the
/// writer completes no revocation while the session is open), so repeated
/// lookups in the same page skip the walk.
#[derive(Debug, Clone, Copy)]
struct CachedLeaf {
    endpoint: u32,
    /// First IOVA of the leaf.
    base: u64,
    /// The leaf's size minus one.
    mask: u64,
    entry: u64,
}

impl CachedLeaf {
    /// No leaf: `iova & !mask` is 0 for every IOVA, never `base`.
    const NONE: Self = Self {
        endpoint: 0,
        base: 1,
        mask: u64::MAX,
        entry: 0,
    };

    #[inline]
    fn piece(&self, iova: u64, access: Access, endpoint: u32) -> Result<Piece, Fault> {
        let need = access.pte_bits();
        if self.entry & need != need {
            return Err(Fault {
                kind: FaultKind::Permission,
                endpoint,
                iova,
                access,
            });
        }
        let within = iova & self.mask;
        Ok(Piece {
            gpa: (self.entry & pte::ADDR_MASK & !self.mask) | within,
            len: self.mask - within + 1,
            mmio: self.entry & pte::MMIO != 0,
        })
    }
}

/// A session slot claimed by one thread. Not `Sync`: one session at a time.
#[derive(Debug)]
pub struct ReaderSlot {
    file: Arc<SlotFile>,
    index: usize,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl ReaderSlot {
    pub(crate) fn new(file: Arc<SlotFile>, index: usize) -> Self {
        Self {
            file,
            index,
            _not_sync: PhantomData,
        }
    }

    /// Index of this slot in its file.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Enters a session on `table`. Translations obtained in it stay valid
    /// until it is dropped (keep sessions short: the writer's UNMAPs wait
    /// for them), or longer for ranges pinned in it.
    #[inline]
    pub fn enter<'a>(&'a mut self, table: &'a TableReader) -> Session<'a> {
        let epoch = grace::enter(
            table.table.word(header::EPOCH),
            self.file.map().slot(self.index),
        );
        let live = grace::session_usable(
            table.table.word(header::LIVENESS),
            table.handover,
            self.file.map().retired_word(),
        );
        Session {
            table,
            slot: self,
            epoch,
            live,
            last: std::cell::Cell::new(CachedLeaf::NONE),
        }
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        grace::exit(self.file.map().slot(self.index));
        self.file.release_slot(self.index);
    }
}

/// A read-side critical section: the writer completes no revocation while
/// it is open.
#[derive(Debug)]
pub struct Session<'a> {
    table: &'a TableReader,
    slot: &'a ReaderSlot,
    epoch: u64,
    /// The session may translate (checked after the fence): the writer
    /// was alive or the table survives it, and the slot file was not
    /// retired. If not, every translation of the session faults.
    live: bool,
    /// The last leaf of the session ([`CachedLeaf::NONE`] before the
    /// first walk).
    last: std::cell::Cell<CachedLeaf>,
}

/// Failure to pin a range.
#[derive(Debug, Error)]
pub enum PinError {
    /// No pin record is free.
    #[error("pin")]
    Slots(#[from] SlotError),
    /// The range does not translate (so there is nothing to keep alive).
    #[error("pin")]
    Fault(#[from] Fault),
}

impl Session<'_> {
    /// The epoch this session was entered in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the session may translate: the daemon was alive when it
    /// began (or the table survives it, [`TableReader::handed_over`]) and
    /// the slot file was not retired. If not, every translation faults
    /// with [`FaultKind::Detached`].
    pub fn writer_alive(&self) -> bool {
        self.live
    }

    /// Translates the page or leaf holding `iova`: the guest-physical
    /// address and how many bytes follow it in the same leaf.
    #[inline]
    pub fn translate_one(&self, endpoint: u32, iova: u64, access: Access) -> Result<Piece, Fault> {
        let c = self.last.get();
        if iova & !c.mask == c.base && c.endpoint == endpoint {
            return c.piece(iova, access, endpoint);
        }
        if !self.live {
            return Err(Fault {
                kind: FaultKind::Detached,
                endpoint,
                iova,
                access,
            });
        }
        match self.table.walk(endpoint, iova) {
            Ok(Walked::Bypass) => Ok(bypass_piece(iova)),
            Ok(Walked::Leaf { entry, span }) => {
                let c = CachedLeaf {
                    endpoint,
                    base: iova & !(span - 1),
                    mask: span - 1,
                    entry,
                };
                self.last.set(c);
                c.piece(iova, access, endpoint)
            }
            Err(kind) => Err(Fault {
                kind,
                endpoint,
                iova,
                access,
            }),
        }
    }

    /// Translates a burst of IOVAs of one endpoint: `out[i]` receives what
    /// [`translate_one`](Self::translate_one)`(endpoint, iovas[i], access)`
    /// gives, for every `i` below the shorter length (returned).
    ///
    /// Cheaper than calling `translate_one` in a loop: the endpoint word
    /// and the session's liveness are read once per burst, and a run of
    /// IOVAs in the cached leaf is served by a tight loop that checks the
    /// permission once. A walk still starts at the root for each IOVA
    /// outside it. (Walking several IOVAs level by level with prefetches,
    /// as DPDK's bulk LPM lookup does, was measured slower than this on
    /// the reference machine: the out-of-order core already overlaps the
    /// independent walks; see `docs/design.md`, "Lookup path".)
    pub fn translate_burst(
        &self,
        endpoint: u32,
        iovas: &[u64],
        access: Access,
        out: &mut [Result<Piece, Fault>],
    ) -> usize {
        let n = iovas.len().min(out.len());
        let (iovas, out) = (&iovas[..n], &mut out[..n]);
        let target = if self.live {
            self.table.target(endpoint)
        } else {
            Err(FaultKind::Detached)
        };
        let need = access.pte_bits();
        // The cached leaf as three words (those of `CachedLeaf::NONE` if
        // the session has none for this endpoint).
        let (mut base, mut mask, mut entry) = match self.last.get() {
            c if c.endpoint == endpoint => (c.base, c.mask, c.entry),
            _ => (CachedLeaf::NONE.base, CachedLeaf::NONE.mask, 0),
        };
        let mut walked = false;
        let mut i = 0;
        while i < n {
            // The run of IOVAs in the cached leaf, with what does not
            // depend on the IOVA computed once for the run.
            let gpa_base = entry & pte::ADDR_MASK & !mask;
            let mmio = entry & pte::MMIO != 0;
            let allowed = entry & need == need;
            while let (Some(&iova), Some(o)) = (iovas.get(i), out.get_mut(i)) {
                if iova & !mask != base {
                    break;
                }
                let within = iova & mask;
                *o = if allowed {
                    Ok(Piece {
                        gpa: gpa_base | within,
                        len: mask - within + 1,
                        mmio,
                    })
                } else {
                    Err(fault(FaultKind::Permission, endpoint, iova, access))
                };
                i += 1;
            }
            // The IOVA after the run: walk, and if it finds a leaf, that is
            // the new cached leaf, which the next run starts with.
            let (Some(&iova), Some(o)) = (iovas.get(i), out.get_mut(i)) else {
                break;
            };
            let kind = match target {
                Ok(Target::Root(root)) => match self.table.walk_from(root, iova) {
                    Ok(Walked::Leaf { entry: e, span }) => {
                        mask = span - 1;
                        base = iova & !mask;
                        entry = e;
                        walked = true;
                        continue;
                    }
                    Ok(Walked::Bypass) => {
                        *o = Ok(bypass_piece(iova));
                        i += 1;
                        continue;
                    }
                    Err(kind) => kind,
                },
                Ok(Target::Bypass) => {
                    *o = Ok(bypass_piece(iova));
                    i += 1;
                    continue;
                }
                Err(kind) => kind,
            };
            *o = Err(fault(kind, endpoint, iova, access));
            i += 1;
        }
        if walked {
            self.last.set(CachedLeaf {
                endpoint,
                base,
                mask,
                entry,
            });
        }
        n
    }

    /// Translates `[iova, iova + len)` into guest-physical pieces, merging
    /// physically contiguous leaves. Yields a fault at the first byte that
    /// does not translate (and nothing after it).
    pub fn translate(&self, endpoint: u32, iova: u64, len: u64, access: Access) -> Pieces<'_> {
        Pieces {
            session: self,
            endpoint,
            next: iova,
            left: len,
            access,
            done: len == 0,
        }
    }

    /// Keeps `[iova, iova + len)` of `endpoint` translatable after this
    /// session ends, until the returned pin is dropped: UNMAPs overlapping
    /// it wait. The range must translate now (checked).
    pub fn pin(&self, endpoint: u32, iova: u64, len: u64, access: Access) -> Result<Pin, PinError> {
        self.pin_each(endpoint, iova, len, access, |_| ())
    }

    /// [`pin`](Self::pin), handing `each` the range's guest-physical pieces
    /// as the check translates them (one walk for both). On a fault the
    /// pieces already handed out belong to a range that is not pinned:
    /// discard them.
    pub fn pin_each(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
        mut each: impl FnMut(Piece),
    ) -> Result<Pin, PinError> {
        let file = &self.slot.file;
        let index = file.claim_pin()?;
        let pin = Pin {
            file: Arc::clone(file),
            index,
        };
        let (state, fields) = file.map().pin(index);
        let last = iova.saturating_add(len.max(1) - 1);
        grace::pin(state, fields, u64::from(endpoint), iova, last);
        for piece in self.translate(endpoint, iova, len, access) {
            each(piece?);
        }
        Ok(pin)
    }
}

impl Drop for Session<'_> {
    #[inline]
    fn drop(&mut self) {
        grace::exit(self.slot.file.map().slot(self.slot.index));
    }
}

/// The pieces of a translated range; see [`Session::translate`].
#[derive(Debug)]
pub struct Pieces<'a> {
    session: &'a Session<'a>,
    endpoint: u32,
    next: u64,
    left: u64,
    access: Access,
    done: bool,
}

impl Iterator for Pieces<'_> {
    type Item = Result<Piece, Fault>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut out: Option<Piece> = None;
        while self.left > 0 {
            let p = match self
                .session
                .translate_one(self.endpoint, self.next, self.access)
            {
                Ok(p) => p,
                Err(f) if out.is_none() => {
                    self.done = true;
                    return Some(Err(f));
                }
                Err(_) => break,
            };
            let take = p.len.min(self.left);
            match &mut out {
                Some(o) if o.gpa.checked_add(o.len) == Some(p.gpa) && o.mmio == p.mmio => {
                    o.len += take
                }
                Some(_) => break,
                None => out = Some(Piece { len: take, ..p }),
            }
            self.left -= take;
            match self.next.checked_add(take) {
                Some(n) => self.next = n,
                None => {
                    self.left = 0;
                }
            }
        }
        if self.left == 0 {
            self.done = true;
        }
        out.map(Ok)
    }
}

/// A pinned range; dropping it lets overlapping UNMAPs complete.
#[derive(Debug)]
pub struct Pin {
    file: Arc<SlotFile>,
    index: usize,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let (state, _) = self.file.map().pin(self.index);
        grace::unpin(state);
        self.file.release_pin(self.index);
    }
}
