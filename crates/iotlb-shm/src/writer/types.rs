//! The writer's public types: what a caller configures, gets back, or is
//! refused with. Re-exported by [`crate::writer`].

use std::time::Duration;

use thiserror::Error;

use crate::geometry::{Geometry, GeometryError};
use crate::layout::pte;
use crate::registry::RegisterError;

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
    pub(super) fn pte_bits(self) -> u64 {
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
    /// Whether readers may go on using the table once this writer is gone
    /// ([`crate::layout::header::HANDOVER`]): set it only if the next
    /// writer learns of every reader of this one and waits for them (the
    /// daemon's `--state-dir` keeps that list).
    pub handover: bool,
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

pub(super) fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> WriterError {
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
    /// [`TableWriter::release_finished_readers`](super::TableWriter::release_finished_readers).
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
