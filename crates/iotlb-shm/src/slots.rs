//! Reader-slot files: one memfd per reader process, holding one session
//! slot per thread and the pin records of in-flight I/O. The reader maps it
//! writable (it is the only shared memory a reader writes); the writer maps
//! it read-only. The file is sealed against resizing so neither side can
//! make the other's mapping fault.
//!
//! A process opens its slot file once. When the last handle on it goes
//! (every [`crate::ReaderSlot`] and [`crate::Pin`] dropped too), the file is
//! marked closed and unmapped: the writer then forgets the process at once,
//! whatever its connection or liveness says.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use thiserror::Error;

use crate::claims::Claims;
use crate::layout::{self, slots as off};
use crate::memfd::{self, SharedMapping};
use crate::sync::AtomicU64;

/// Default session slots per reader process (threads that translate).
pub const DEFAULT_SLOTS: usize = 64;
/// Default pin records per reader process (I/Os in flight at once).
pub const DEFAULT_PINS: usize = 1024;
/// Upper bound on either count, so a file size is always sane.
pub const MAX_RECORDS: usize = 1 << 16;

/// Failure while creating, opening or using a slot file.
#[derive(Debug, Error)]
pub enum SlotError {
    /// Creating, sizing, sealing or mapping the memfd failed.
    #[error("slot file: {step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Counts of zero or above [`MAX_RECORDS`].
    #[error("slot file with {slots} slots and {pins} pins is outside 1..={MAX_RECORDS}")]
    Counts {
        /// Slots asked for.
        slots: u64,
        /// Pins asked for.
        pins: u64,
    },
    /// The file is not a layout-v2 slot file of a size that fits its counts.
    #[error("not a layout-v2 slot file (magic {magic:#x}, version {version}, {size} bytes)")]
    Format {
        /// Magic found.
        magic: u64,
        /// Version found.
        version: u64,
        /// File size.
        size: u64,
    },
    /// The file is not sealed against shrinking (the other side could make
    /// its mapping fault).
    #[error("slot file is not sealed against resizing (seals {0:#x})")]
    NotSealed(i32),
    /// Every slot is claimed by a thread.
    #[error("all {0} session slots of this process are in use")]
    NoFreeSlot(usize),
    /// Every pin record is in use.
    #[error("all {0} pin records of this process are in use")]
    NoFreePin(usize),
    /// The file was closed by this process already (the writer may have
    /// forgotten it); ask the daemon for a new one.
    #[error("slot file already closed; connect again for a new one")]
    Closed,
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> SlotError {
    move |source| SlotError::Io { step, source }
}

/// Creates a slot file for one reader process (done by the writer's side,
/// which then hands the descriptor to the reader).
pub fn create(slot_count: usize, pin_count: usize) -> Result<OwnedFd, SlotError> {
    check_counts(slot_count as u64, pin_count as u64)?;
    let len = off::file_bytes(slot_count, pin_count);
    let fd = memfd::create(c"iotlb-slots", len as u64).map_err(io("create memfd"))?;
    {
        let map = SharedMapping::map(as_borrowed(&fd), len, true).map_err(io("map"))?;
        map.word(off::SLOT_COUNT)
            .store(slot_count as u64, crate::sync::Ordering::Relaxed);
        map.word(off::PIN_COUNT)
            .store(pin_count as u64, crate::sync::Ordering::Relaxed);
        map.word(off::VERSION)
            .store(layout::VERSION, crate::sync::Ordering::Relaxed);
        map.word(off::MAGIC)
            .store(layout::SLOTS_MAGIC, crate::sync::Ordering::Release);
    }
    memfd::seal(as_borrowed(&fd), memfd::SEALS_FIXED_SIZE).map_err(io("seal"))?;
    Ok(fd)
}

fn as_borrowed(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

fn check_counts(slots: u64, pins: u64) -> Result<(), SlotError> {
    let ok = |n: u64| (1..=MAX_RECORDS as u64).contains(&n);
    if ok(slots) && ok(pins) {
        Ok(())
    } else {
        Err(SlotError::Counts { slots, pins })
    }
}

/// A validated mapping of a slot file, from either side.
#[derive(Debug)]
pub struct SlotMap {
    map: SharedMapping,
    slot_count: usize,
    pin_count: usize,
}

impl SlotMap {
    /// Maps and validates a slot file. The counts are read once, here: a
    /// reader rewriting its header later changes nothing for the writer.
    pub fn open(fd: BorrowedFd<'_>, writable: bool) -> Result<Self, SlotError> {
        let seals = memfd::seals(fd).map_err(io("read seals"))?;
        if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)
            != libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
        {
            return Err(SlotError::NotSealed(seals));
        }
        let size = memfd::size(fd).map_err(io("stat"))?;
        let head = SharedMapping::map(fd, 4096, false).map_err(io("map header"))?;
        let w = |o| head.word(o).load(crate::sync::Ordering::Acquire);
        let (magic, version, slots, pins) = (
            w(off::MAGIC),
            w(off::VERSION),
            w(off::SLOT_COUNT),
            w(off::PIN_COUNT),
        );
        let bad = SlotError::Format {
            magic,
            version,
            size,
        };
        if magic != layout::SLOTS_MAGIC || version != layout::VERSION {
            return Err(bad);
        }
        check_counts(slots, pins)?;
        let (slot_count, pin_count) = (slots as usize, pins as usize);
        let len = off::file_bytes(slot_count, pin_count);
        if size < len as u64 {
            return Err(bad);
        }
        let map = SharedMapping::map(fd, len, writable).map_err(io("map"))?;
        Ok(Self {
            map,
            slot_count,
            pin_count,
        })
    }

    /// Number of session slots.
    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    /// Number of pin records.
    pub fn pin_count(&self) -> usize {
        self.pin_count
    }

    /// Slots the writer must scan: the reader's high-water mark, clamped to
    /// the count read at open (a reader cannot make the writer read past it).
    pub fn slots_in_use(&self) -> usize {
        (self
            .map
            .word(off::SLOTS_USED)
            .load(crate::sync::Ordering::Acquire) as usize)
            .min(self.slot_count)
    }

    /// Whether the reader process closed the file: none of its slots or pins
    /// can hold anything any more.
    pub fn closed(&self) -> bool {
        crate::grace::slots_closed(self.map.word(off::CLOSED))
    }

    /// The retired word ([`crate::grace::retire`]).
    pub fn retired_word(&self) -> &AtomicU64 {
        self.map.word(off::RETIRED)
    }

    /// Whether the reader process retired the file: it starts no session
    /// with it any more ([`SlotFile::retire`]).
    pub fn retired(&self) -> bool {
        crate::grace::slots_retired(self.retired_word())
    }

    /// Whether no slot is inside a session and no pin is held, whatever
    /// their epochs. Once the file is [`Self::retired`] and this holds,
    /// nothing of the process can use the table this file was given with.
    pub fn idle(&self) -> bool {
        (0..self.slots_in_use()).all(|s| crate::grace::outside_session(self.slot(s)))
            && (0..self.pins_in_use()).all(|j| {
                let (state, fields) = self.pin(j);
                crate::grace::read_pin(state, fields).is_none()
            })
    }

    /// Pin records the writer must scan, likewise.
    pub fn pins_in_use(&self) -> usize {
        (self
            .map
            .word(off::PINS_USED)
            .load(crate::sync::Ordering::Acquire) as usize)
            .min(self.pin_count)
    }

    /// Session slot `i` (< `slot_count`).
    #[inline]
    pub fn slot(&self, i: usize) -> &AtomicU64 {
        self.map.word(off::slot_offset(i))
    }

    /// Pin record `j` (< `pin_count`): its state word and its three fields.
    pub fn pin(&self, j: usize) -> (&AtomicU64, [&AtomicU64; 3]) {
        let o = off::pin_offset(self.slot_count, j);
        (
            self.map.word(o),
            [
                self.map.word(o + 8),
                self.map.word(o + 16),
                self.map.word(o + 24),
            ],
        )
    }

    /// Base address of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }
}

/// Raises a high-water mark to cover `index` (called after the claim,
/// before the claimed record is used: the Release orders it before the
/// record's own stores, which the writer reads after it).
fn raise(mark: &AtomicU64, index: usize) {
    let need = index as u64 + 1;
    if mark.load(crate::sync::Ordering::Relaxed) < need {
        mark.fetch_max(need, crate::sync::Ordering::Release);
    }
}

/// A reader process's slot file, with the claims of its threads and I/Os.
#[derive(Debug)]
pub struct SlotFile {
    map: SlotMap,
    free_slots: Claims,
    free_pins: Claims,
    /// The file's descriptor, kept to hand the file to a restarted daemon
    /// ([`crate::BackendClient::hand_over`]).
    fd: Option<OwnedFd>,
}

impl SlotFile {
    /// Opens the slot file the writer gave this process, writable. Open it
    /// once per process: dropping the last handle closes it for good.
    pub fn open(fd: BorrowedFd<'_>) -> Result<Arc<Self>, SlotError> {
        let map = SlotMap::open(fd, true)?;
        if map.closed() {
            return Err(SlotError::Closed);
        }
        Ok(Arc::new(Self {
            free_slots: Claims::new(map.slot_count),
            free_pins: Claims::new(map.pin_count),
            map,
            fd: fd.try_clone_to_owned().ok(),
        }))
    }

    /// The file's descriptor (`None` if it could not be kept).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Stops sessions from starting with this file: every session entered
    /// from now on faults ([`crate::FaultKind::Detached`]); the sessions
    /// already open and the pins already held are unaffected. Called once
    /// the process has connected to a restarted daemon, before it hands
    /// this file to it.
    pub fn retire(&self) {
        crate::grace::retire(self.map.retired_word());
    }

    /// Whether [`Self::retire`] was called.
    pub fn retired(&self) -> bool {
        self.map.retired()
    }

    /// The mapping.
    pub fn map(&self) -> &SlotMap {
        &self.map
    }

    /// Claims a session slot for the calling thread.
    pub fn claim_slot(self: &Arc<Self>) -> Result<crate::reader::ReaderSlot, SlotError> {
        let index = self
            .free_slots
            .claim()
            .ok_or(SlotError::NoFreeSlot(self.map.slot_count))?;
        raise(self.map.map.word(off::SLOTS_USED), index);
        Ok(crate::reader::ReaderSlot::new(Arc::clone(self), index))
    }

    pub(crate) fn release_slot(&self, index: usize) {
        self.free_slots.release(index);
    }

    pub(crate) fn claim_pin(&self) -> Result<usize, SlotError> {
        let index = self
            .free_pins
            .claim()
            .ok_or(SlotError::NoFreePin(self.map.pin_count))?;
        raise(self.map.map.word(off::PINS_USED), index);
        Ok(index)
    }

    pub(crate) fn release_pin(&self, index: usize) {
        self.free_pins.release(index);
    }
}

impl Drop for SlotFile {
    /// Every slot and pin handle holds the file, so none is left: nothing of
    /// this process can use the file again. Tell the writer before unmapping.
    fn drop(&mut self) {
        crate::grace::close_slots(self.map.map.word(off::CLOSED));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_created_file_opens_and_bad_counts_are_refused() {
        let fd = create(4, 8).unwrap();
        let f = SlotFile::open(fd.as_fd()).unwrap();
        assert_eq!((f.map().slot_count(), f.map().pin_count()), (4, 8));
        let claims: Vec<_> = (0..4).map(|_| f.claim_slot().unwrap()).collect();
        assert!(matches!(f.claim_slot(), Err(SlotError::NoFreeSlot(4))));
        drop(claims);
        assert!(f.claim_slot().is_ok());
        assert!(matches!(create(0, 1), Err(SlotError::Counts { .. })));
        assert!(matches!(
            create(1, MAX_RECORDS + 1),
            Err(SlotError::Counts { .. })
        ));
    }

    #[test]
    fn unsealed_or_foreign_files_are_refused() {
        let plain = memfd::create(c"x", 4096).unwrap();
        assert!(matches!(
            SlotMap::open(plain.as_fd(), false),
            Err(SlotError::NotSealed(_))
        ));
        memfd::seal(plain.as_fd(), memfd::SEALS_FIXED_SIZE).unwrap();
        assert!(matches!(
            SlotMap::open(plain.as_fd(), false),
            Err(SlotError::Format { magic: 0, .. })
        ));
    }

    #[test]
    fn dropping_the_last_handle_closes_the_file_for_the_writer_and_for_good() {
        let fd = create(2, 2).unwrap();
        let writer_view = SlotMap::open(fd.as_fd(), false).unwrap();
        let file = SlotFile::open(fd.as_fd()).unwrap();
        let slot = file.claim_slot().unwrap();
        drop(file);
        assert!(!writer_view.closed(), "a claimed slot keeps the file open");
        drop(slot);
        assert!(writer_view.closed());
        assert!(matches!(SlotFile::open(fd.as_fd()), Err(SlotError::Closed)));
    }

    #[test]
    fn the_file_cannot_be_resized_by_either_side() {
        let fd = create(1, 1).unwrap();
        assert!(memfd::resize(fd.as_fd(), 0).is_err());
        assert!(memfd::resize(fd.as_fd(), 1 << 20).is_err());
    }
}
